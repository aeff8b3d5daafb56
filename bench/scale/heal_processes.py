"""Healing on 1 process vs 2 (torchrun + FSDP2, gloo) on this CPU machine, for bench/RESULTS.md "Healing on many
processes":

1. SmolLM2-135M with the demo's plan (the 16 removals of bench/results/demo-2026-12-03/prune/plan.json, rebuilt
   from the original without a search), healed by `rtk heal` at the demo's defaults (61,440 tokens of WikiText-2
   valid), as 1 process x 2 threads, as `rtk heal --nproc 2` (2 processes x 1 thread), and as 1 process x 1 thread
   (what the thread count moves), and as 1 process reading each global batch of 4 blocks in 2 micro-batches of 2
   (bench/scale/heal_processes_mb2.yaml: the summation order of 2 ranks, in one process). Same PPL expected (WikiText-2 test, 32 x 256, fp32); tokens/s said plainly.
2. A random Llama of 1.5 GB in fp32 (bench/scale/gpu_heal.py --shape llama-1.5gb), fully distilled for a few
   steps under 1 process (2 threads) and 2 processes (1 thread each): peak memory per process, tokens/s.

    .venv/bin/python bench/scale/heal_processes.py -o bench/results/heal-processes [--tokens N] [--parts 1,2]

3. The healed SmolLM2 models of 1. on the same evaluation blocks: paired intervals of their PPL ratios.

Run it alone on the machine (it is the measurement); each run is skipped when its output is already there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_PLAN = REPO / "bench" / "results" / "demo-2026-12-03" / "prune" / "plan.json"


def pruned_demo(root: Path) -> Path:
    """OUT of `rtk prune recipes/smollm2-demo.yaml` rebuilt from its recorded plan: the same removals applied to the
    original, exported the same way, with the recorded plan.json (its PPLs are reused by rtk heal, as after make
    demo)."""
    out = root / "smollm2-demo"
    if (out / "model" / "config.json").is_file():
        return out
    from rtk.export.safetensors import export_model
    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan

    plan = json.loads(DEMO_PLAN.read_text())
    model, tok, path = load_model(plan["model"], "float32", "cpu")
    pruned = apply_plan(model, plan["removed_sublayers"])
    tmp = root / "smollm2-demo.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plan["model_path"] = path  # this machine's cache of the original
    export_model(pruned, tok, tmp / "model", original=model, plan=plan, source=path)
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
    tmp.rename(out)
    return out


def run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def part_smollm2(root: Path, tokens: int | None) -> dict:
    pruned = pruned_demo(root)
    rtk = str(Path(sys.executable).parent / "rtk")
    before = json.loads((root / "summary.json").read_text()) if (root / "summary.json").is_file() else {}
    res = {}
    # 1x1 tells float noise from a difference: same per-process thread count as 2x1, the same order of operations
    # as 1x2 but within each matmul
    # 1x1-split: one process reading each global batch of 4 blocks as 2 micro-batches of 2, as each of 2 ranks does
    split = str(Path(__file__).with_name("heal_processes_mb2.yaml"))
    for name, extra, threads in (("1x2", ["--threads", "2"], "2"), ("2x1", ["--nproc", "2"], "1"),
                                 ("1x1", ["--threads", "1"], "1"),
                                 ("1x1-split", ["--threads", "1", "--config", split], "1")):
        out = root / f"smollm2-healed-{name}"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        wall = before.get("smollm2_demo_plan", {}).get(name, {}).get("command_seconds")  # a run made before
        if not (out / "plan.json").is_file():
            cmd = [rtk, "heal", str(pruned), "-o", str(out), "--quiet", *extra]
            if tokens:
                cmd += ["--tokens", str(tokens)]
            wall = run(cmd, env, root / f"smollm2-healed-{name}.log")
        h = json.loads((out / "plan.json").read_text())["heal"]
        res[name] = {"processes": h.get("processes", 1), "threads_per_process": h["threads"],
                     "tokens": h["tokens"], "train_seconds": h["train_seconds"],
                     "tokens_per_second": round(h["tokens_per_second"], 1), "command_seconds": wall,
                     "ppl_before": h["eval"]["ppl_before"], "ppl_after": h["eval"]["ppl_after"],
                     "loss_last": h["loss_last"], "measured": h["eval"]["measured"]}
    return res


def part_paired(root: Path) -> dict:
    """The healed SmolLM2 models compared on the same evaluation blocks: per-block mean NLL (WikiText-2 test 32 x 256,
    fp32), a paired bootstrap over the blocks (10,000 resamples, seed 0); PPL ratio = exp(mean difference)."""
    import math

    import torch

    from rtk.data import DataConfig, token_blocks
    from rtk.model.load import load_model
    from rtk.model.ppl import _full_logits, logits_nll

    per = {}
    for name in ("1x2", "2x1", "1x1-split"):
        m, tok, _ = load_model(str(root / f"smollm2-healed-{name}" / "model"), "float32", "cpu")
        blocks, _ = token_blocks(tok, DataConfig().evaluation, "evaluation")
        with torch.no_grad():
            per[name] = torch.tensor([logits_nll(lg, ids[:, 1:]) / (ids.shape[1] - 1)
                                      for ids, lg in _full_logits(m, blocks, 1)])
    g = torch.Generator().manual_seed(0)
    out = {"measured": part_paired.__doc__.split(": ", 1)[1].replace("\n   ", "").strip()}
    for a, b in (("2x1", "1x2"), ("1x1-split", "1x2"), ("2x1", "1x1-split")):
        d = per[a] - per[b]
        boots = torch.stack([d[torch.randint(0, len(d), (len(d),), generator=g)].mean() for _ in range(10_000)])
        out[f"{a} vs {b}"] = {"ppl_ratio": math.exp(d.mean().item()), "blocks": len(d),
                              "ci95": [math.exp(boots.quantile(q).item()) for q in (0.025, 0.975)]}
    (root / "paired.json").write_text(json.dumps(out, indent=1))
    return out


def part_random(root: Path) -> dict:
    script = str(REPO / "bench" / "scale" / "gpu_heal.py")
    env = {**os.environ, "PYTHONPATH": str(REPO / "toolchain")}
    args = ["--shape", "llama-1.5gb", "--device", "cpu", "--methods", "full", "--steps", "3"]
    res = {}
    for name, launcher, threads in (("1x2", [sys.executable], "2"),
                                    ("2x1", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node=2"], "1")):
        out = root / f"llama-1.5gb-{name}.json"
        if not out.is_file():
            run([*launcher, script, *args, "-o", str(out)], {**env, "OMP_NUM_THREADS": threads},
                root / f"llama-1.5gb-{name}.log")
        res[name] = json.loads(out.read_text())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--tokens", type=int, default=None, help="SmolLM2's healing budget (default: rtk heal's)")
    ap.add_argument("--parts", default="1,3,2")
    a = ap.parse_args(argv)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    summary = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d")}
    if "1" in a.parts.split(","):
        summary["smollm2_demo_plan"] = part_smollm2(root, a.tokens)
        print(json.dumps(summary["smollm2_demo_plan"], indent=1), flush=True)
    if "3" in a.parts.split(","):
        summary["paired"] = part_paired(root)
        print(json.dumps(summary["paired"], indent=1), flush=True)
    if "2" in a.parts.split(","):
        summary["random_llama_1_5gb"] = part_random(root)
        print(json.dumps({k: v["methods"]["full"] for k, v in summary["random_llama_1_5gb"].items()}, indent=1))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
