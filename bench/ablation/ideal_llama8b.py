"""Ideal (roofline, rtk.model.cost) speedups for a Llama-3.1-8B shape with ~20% of parameters removed,
to set beside the H200 measurements quoted in bench/RESULTS.md (Ablations). Config only, no weights.

    PYTHONPATH=toolchain python bench/ablation/ideal_llama8b.py
"""
from rtk.model.cost import ideal_speedup
from rtk.model.modeling_rtk import RtkDeciConfig

cfg = RtkDeciConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=14336, tie_word_embeddings=False)
plans = {
    "9 MLPs (~19.7% of params)": [f"mlp.{i}" for i in range(20, 29)],
    "16 attn + 5 MLPs (~19.3%)": [f"attn.{i}" for i in range(12, 28)] + [f"mlp.{i}" for i in range(22, 27)],
}
print("| plan | context | decode B=1 | decode B=16 | decode B=64 | decode B=256 | prefill B=1 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, removed in plans.items():
    for ctx in (512, 2048):
        dec = [ideal_speedup(cfg, removed, b, ctx, "decode")["speedup"] for b in (1, 16, 64, 256)]
        pre = ideal_speedup(cfg, removed, 1, ctx, "prefill")["speedup"]
        print(f"| {name} | {ctx} | " + " | ".join(f"{x:.2f}x" for x in dec) + f" | {pre:.2f}x |")
