"""Healing at Llama-3.1-8B shape on one GPU: rtk.heal.trainer trains a pruned student (20% of parameters gone:
the MLPs of layers 20-27 and the attention of layers 22-26) towards its dense teacher, bf16, full fine-tuning and
LoRA, and reports tokens/s, model FLOP utilisation, peak GPU memory against rtk's own estimate (which decides
gradient checkpointing), and the loss over the steps. Random weights and tokens: timing and memory only. Needs
torch, transformers, peft (for LoRA) and rtk's source, what the lent H200 machine has:

    PYTHONPATH=toolchain python bench/scale/gpu_heal.py -o bench/results/scale/h200_heal.json
    PYTHONPATH=toolchain python bench/scale/gpu_heal.py --tiny --device cpu -o /tmp/x.json   # the test's run

Each method: one warm-up step (kernels, allocator, optimizer state), then `--steps` optimizer steps of
micro_batch x grad_accum blocks of seq_len tokens, the recipes/llama-8b-gpu.yaml healing's step (4 x 8 x 2048)
unless told otherwise.

Under torchrun it heals on N processes as `rtk heal` does (FSDP2 shards student and teacher; each rank its share of
every global batch) and reports memory per process; the warm-up is then the first of `--steps` + 1 steps, whose
time is left out:

    torchrun --nproc-per-node 8 bench/scale/gpu_heal.py -o bench/results/scale/h100x8_heal.json
    torchrun --nproc-per-node 2 bench/scale/gpu_heal.py --shape llama-1.5gb --device cpu --methods full -o x.json

`--shape llama-1.5gb` is a random Llama of 1.5 GB in fp32 (379M parameters), for CPU runs. Model FLOPs per token: teacher forward + student forward and backward (full: 3x the
layers' forward and 2x the frozen head's; LoRA: 2x, activation gradients only), causal attention included,
recomputation under gradient checkpointing not counted (MFU's convention).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_step import LLAMA_8B, TINY, build, timed, write_result  # noqa: E402  (also shims click where it is missing)

from rtk.model.cost import head_kernel, model_cost, model_params  # noqa: E402
from rtk.heal.distributed import current_world, join, leave, share  # noqa: E402
from rtk.heal.memory import available_memory, with_checkpointing  # noqa: E402
from rtk.heal.trainer import distill  # noqa: E402
from rtk.model.modeling_rtk import RtkDeciLMForCausalLM  # noqa: E402
from rtk.model.rewrite import apply_plan, pruned_config  # noqa: E402

# What rtk.heal.config.HealConfig / LoraSpec default to (pydantic is not on a bare GPU machine, so the settings are
# plain here; tests/test_bench_scale.py holds them equal to the recipe's).
HEAL_DEFAULTS = dict(warmup=0.05, min_lr=0.1, weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, kl_weight=1.0,
                     ce_weight=0.5, hidden_weight=0.0, train_embeddings=False, gradient_checkpointing="auto", seed=0,
                     eval_every=0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The 8B recipe's healing (recipes/llama-8b-gpu.yaml); full fine-tuning at a tenth of LoRA's rate.
METHODS = {"full": dict(lr=2e-5), "lora": dict(lr=2e-4, lora=dict(rank=64, alpha=128.0, dropout=0.0))}
REMOVED = {"Llama-3.1-8B": [f"mlp.{i}" for i in range(20, 28)] + [f"attn.{i}" for i in range(22, 27)],
           "tiny": ["mlp.2", "attn.3"],
           "llama-1.5gb": [f"mlp.{i}" for i in range(12, 16)] + [f"attn.{i}" for i in range(13, 17)]}
LLAMA_1_5GB = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                   num_key_value_heads=8, intermediate_size=4096)
SHAPES = {"Llama-3.1-8B": LLAMA_8B, "tiny": TINY, "llama-1.5gb": LLAMA_1_5GB}


def heal_config(method: str, tokens: int, micro_batch: int, grad_accum: int) -> types.SimpleNamespace:
    m = dict(METHODS[method])
    lora = types.SimpleNamespace(**m.pop("lora"), targets=list(LORA_TARGETS)) if "lora" in m else None
    return types.SimpleNamespace(**HEAL_DEFAULTS, **m, method=method, lora=lora, tokens=tokens,
                                 micro_batch=micro_batch, grad_accum=grad_accum, checkpoint_every=10 ** 9)


def pruned_student(teacher: RtkDeciLMForCausalLM, removed: list[str]) -> RtkDeciLMForCausalLM:
    """The teacher without the `removed` sublayers, in weights of its own (apply_plan's share the teacher's)."""
    return copy.deepcopy(apply_plan(teacher, removed))


def forward_flops_per_token(config, t: int, removed: list[str] = ()) -> tuple[float, float]:
    """(decoder layers, LM head) forward FLOPs per token over a t-token sequence, from rtk.model.cost's prefill model
    (whose prefill runs the head on the last token only)."""
    head = head_kernel(config, 1).flops
    return (model_cost(config, 1, t, "prefill", removed)["flops"] - head) / t, head


class PeakRSS:
    """This process's resident memory, sampled every 20 ms while it runs (CPU runs: peak memory per process)."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def sharded_need(student, teacher, cfg, t: int, world, device: str):
    """rtk.heal.memory's estimate per process, with gradient checkpointing where the estimate says so (what
    rtk heal's check_fits decides before loading)."""
    return with_checkpointing(student.config, teacher.config, cfg, t, next(student.parameters()).element_size(),
                              available_memory(device), processes=world.size,
                              micro_batch=share(cfg.micro_batch, cfg.grad_accum, world).micro)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model, 2 x 2 blocks of 32 tokens (exercises the script)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="the model's shape (default Llama-3.1-8B)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per method (8B: 4)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200 SXM: 989)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    name = "tiny" if a.tiny else (a.shape or "Llama-3.1-8B")
    small = name != "Llama-3.1-8B"
    t = a.seq_len or (32 if a.tiny else 256 if small else 2048)
    mb = a.micro_batch or (2 if small else 4)
    ga = a.grad_accum or (2 if small else 8)
    steps = a.steps or (6 if a.tiny else 4)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    world = current_world("cpu" if a.device == "cpu" else "cuda")
    device = world.device if world else a.device
    if world is not None:
        join(world)

    # under torchrun rank 0 builds the models, the others their skeletons (their shards come from rank 0, as in
    # rtk heal)
    where = device if world is None or world.main else "meta"
    teacher, build_s = timed(lambda: build(SHAPES[name], where, dtype), device)
    removed = REMOVED[name]
    per_step = mb * ga * t
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, teacher.config.vocab_size, ((steps + 1) * mb * ga, t), generator=g)
    lt, ht = forward_flops_per_token(teacher.config, t)
    ls, hs = forward_flops_per_token(teacher.config, t, removed)
    res = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name(0)
           if device.startswith("cuda") else "cpu", "torch": torch.__version__,
           "processes": world.size if world else 1, "threads_per_process": torch.get_num_threads(),
           "teacher_params": model_params(teacher.config),
           "student_params": model_params(pruned_config(teacher.config, removed)), "removed": removed,
           "step": f"{mb} x {ga} blocks of {t} random tokens ({per_step:,} tokens)", "timed_steps": steps,
           "build_seconds": round(build_s, 1), "methods": {}}
    res["params_removed"] = round(1 - res["student_params"] / res["teacher_params"], 4)
    for i, method in enumerate(a.methods.split(",")):
        if world is not None and i:  # the last method's healing sharded the teacher: a fresh one
            teacher = build(SHAPES[name], where, dtype)
        student = pruned_student(teacher, removed)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if world is None:
            # warm-up: one step on the same student (its own data), not timed
            student, _ = distill(student, teacher, blocks[: mb * ga], heal_config(method, per_step, mb, ga), None,
                                 "", progress=False, echo=lambda s: None)
            cfg = heal_config(method, steps * per_step, mb, ga)
            with PeakRSS() as rss:
                (student, rec), wall = timed(lambda: distill(student, teacher, blocks[mb * ga:], cfg, None, "",
                                                             progress=True, echo=print), device)
        else:  # one healing of steps + 1 steps (FSDP shards the models once); the first step's time left out
            cfg = heal_config(method, (steps + 1) * per_step, mb, ga)
            need = sharded_need(student, teacher, cfg, t, world, device)
            with PeakRSS() as rss:
                student, rec = distill(student, teacher, blocks, cfg, None, "", progress=world.main,
                                       echo=print if world.main else (lambda s: None), world=world,
                                       sharded_need=need)
            wall = sum(s_["seconds"] for s_ in rec["history"]["steps"][1:])
        tok_s = steps * per_step / wall
        student_mult = (3 * ls + 2 * hs) if method == "full" else 2 * (ls + hs)
        flops_per_token = lt + ht + student_mult
        hist = rec["history"]["steps"][-steps:]
        row = {"tokens_per_s": round(tok_s, 1), "seconds_per_step": float(f"{wall / steps:.4g}"),
               "model_tflops": round(flops_per_token * tok_s / 1e12, 2),
               "mfu": round(flops_per_token * tok_s / (a.peak_tflops * (world.size if world else 1) * 1e12), 4),
               "trainable_params": rec["trainable_params"], "gradient_checkpointing": rec["gradient_checkpointing"],
               "memory_estimate_gib": round(rec["memory_estimate_bytes"] / 2 ** 30, 2),
               "memory_available_gib": round(rec["memory_available_bytes"] / 2 ** 30, 1),
               "lr": cfg.lr, "kl": [round(s_["kl"], 5) for s_ in hist],
               "loss": [round(s_["loss"], 4) for s_ in hist]}
        if device.startswith("cuda"):
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        else:
            row["peak_rss_gib_training"] = round(rss.peak / 2 ** 30, 2)  # while healing (models built before)
        if world is not None:
            import torch.distributed as dist

            per_rank = [None] * world.size
            dist.all_gather_object(per_rank, {k: row.get(k) for k in ("peak_gpu_gib", "peak_rss_gib_training")})
            row["per_process"] = per_rank
        res["methods"][method] = row
        if world is None or world.main:
            print(json.dumps({method: row}), flush=True)
        del student
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    import resource

    res["peak_rss_gib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    if world is not None:
        import torch.distributed as dist

        peaks = [None] * world.size
        dist.all_gather_object(peaks, res["peak_rss_gib_process"])
        res["peak_rss_gib_process"] = peaks
        leave()
        if not world.main:
            return None
    return write_result(res, a.out)


if __name__ == "__main__":
    main()
