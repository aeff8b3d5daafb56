"""One scoring step of a Llama-3.1-8B-shaped model (random weights, bf16) on one GPU, both engines, against
the FLOP ideal. Needs only torch, transformers and rtk's source (the lent H200 machine installs nothing):

    PYTHONPATH=toolchain python bench/scale/gpu_step.py -o bench/results/scale/h200_step.json
    PYTHONPATH=toolchain python bench/scale/gpu_step.py --tiny --device cpu -o /tmp/x.json   # the test's run

A step = the PPL of the dense model with each of the 63 sublayers other than attn.0 removed, on 32 x 2048
random calibration tokens (random weights and tokens: timing only). FLOPs are counted per stream-layer
(2 x weights x tokens, plus causal attention 2 x T^2 x heads x head_dim per block) and for the LM head, and
MFU = FLOPs / seconds / the GPU's dense peak (--peak-tflops; H200 SXM bf16: 989).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch

try:
    import click  # noqa: F401  rtk's CLI dependency (rtk.errors); a bare GPU machine may lack it
except ImportError:
    shim = types.ModuleType("click")
    shim.ClickException = type("ClickException", (Exception,), {"__init__": lambda s, m: (
        Exception.__init__(s, m), setattr(s, "message", m))[0]})
    sys.modules["click"] = shim

from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM, make_block  # noqa: E402
from rtk.prune.scoring import ModelScorer, candidates  # noqa: E402
from rtk.prune.scoring.layer_major import LayerMajorScorer  # noqa: E402
from rtk.model.layers import InMemory  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)


def build(shape: dict, device: str, dtype: torch.dtype) -> RtkDeciLMForCausalLM:
    """A random model of `shape` on `device` (on "meta": its skeleton, no weights)."""
    group = shape["num_attention_heads"] // shape["num_key_value_heads"]
    cfg = RtkDeciConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        block_configs=[make_block(group, shape["intermediate_size"])
                                       for _ in range(shape["num_hidden_layers"])])
    with torch.device("meta"):
        model = RtkDeciLMForCausalLM(cfg)
    if device == "meta":
        return model.to(dtype).eval()
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.model.inv_freq = model.model._rope(cfg)[0].to(device)
    return model.to(dtype).eval()


def step_flops(model, cands, n: int, t: int) -> float:
    """FLOPs of one step: every candidate's stream from its layer to the end, plus the head; the base stream's
    shared prefix once (as both engines reuse it)."""
    c = model.config
    hd, heads = c.head_dim, c.num_attention_heads
    attn_w = c.hidden_size * hd * (heads + 2 * c.num_key_value_heads) + heads * hd * c.hidden_size
    mlp_w = 3 * c.hidden_size * c.intermediate_size
    tokens = n * t
    attn = 2 * attn_w * tokens + 2 * heads * hd * t * t * n  # projections + causal QK^T and AV
    mlp = 2 * mlp_w * tokens
    head = 2 * c.hidden_size * c.vocab_size * n * (t - 1)
    L = c.num_hidden_layers
    total = 0.0
    last = max(x.layer for x in cands)
    total += sum(attn + mlp for _ in range(last + 1))  # the base stream up to the last candidate's layer
    for x in cands:
        rest = (L - x.layer - 1) * (attn + mlp)
        own = mlp if x.kind == "attn" else attn if x.kind == "mlp" else 0
        total += rest + own + head
    return total


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def write_result(res: dict, out: str) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model, 4 x 32 tokens (exercises the script)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4, help="token blocks per forward pass (both engines)")
    ap.add_argument("--memory-gb", type=float, default=80.0, help="layer-major stream budget (GB)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--engines", default="layer-major,per-candidate")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    shape = TINY if a.tiny else LLAMA_8B
    n = a.samples or (4 if a.tiny else 32)
    t = a.seq_len or (32 if a.tiny else 2048)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    model, build_s = timed(lambda: build(shape, a.device, dtype), a.device)
    blocks = torch.randint(0, shape["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))
    cands = candidates(model, protect=["attn.0"])
    flops = step_flops(model, cands, n, t)
    res = {"shape": "tiny" if a.tiny else "Llama-3.1-8B", "config": shape, "dtype": str(dtype).removeprefix("torch."),
           "calibration": f"{n} x {t} random tokens", "candidates": len(cands), "step_pflop": flops / 1e15,
           "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu",
           "torch": torch.__version__, "build_seconds": round(build_s, 1), "engines": {}}
    ref = None
    for engine in a.engines.split(","):
        if engine == "layer-major":
            s = LayerMajorScorer(InMemory(model), blocks, a.batch_size, int(a.memory_gb * 1e9), progress=True)
        else:
            s = ModelScorer(model, blocks, a.batch_size, reuse_activations=True, progress=True)
        s.score(frozenset(), cands[:2])  # warm-up: kernels, allocator
        groups_before = getattr(s, "groups_run", 0)
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        got, sec = timed(lambda: s.score(frozenset(), cands, desc=engine), a.device)
        ref = ref or got
        row = {"seconds": float(f"{sec:.4g}"),  # 4 significant digits: a tiny run takes milliseconds
               "candidate_evals_per_s": round(len(cands) / sec, 3),
               "candidate_eval_tokens_per_s": round(len(cands) * n * t / sec, 1),
               "tflops": round(flops / sec / 1e12, 1), "mfu": round(flops / sec / (a.peak_tflops * 1e12), 3),
               "max_rel_ppl_diff_vs_first_engine": max(abs(got[k] - ref[k]) / ref[k] for k in ref)}
        if a.device.startswith("cuda"):
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
        if engine == "layer-major":
            row["groups"] = s.groups_run - groups_before
        res["engines"][engine] = row
        print(json.dumps({engine: row}), flush=True)
    res["ideal_seconds_at_peak"] = round(flops / (a.peak_tflops * 1e12), 2)
    return write_result(res, a.out)


if __name__ == "__main__":
    main()
