"""Scoring throughput of `rtk prune` on SmolLM2-135M: candidate evaluations per second and tokens
per second, for the per-candidate engine with and without activation reuse and for the layer-major engine.
Writes bench/results/scoring_throughput.json.

    RTK_DATA_DIR=../shared/data .venv/bin/python bench/scoring_throughput.py [--samples 4 --seq-len 128]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rtk.data import token_blocks
from rtk.model.load import load_model
from rtk.data import DataSpec
from rtk.prune.scoring import ModelScorer, candidates
from rtk.prune.scoring.layer_major import LayerMajorScorer
from rtk.model.layers import InMemory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lm-batch-size", type=int, default=16, help="layer-major: token blocks per forward")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring_throughput.json"))
    a = ap.parse_args()
    model, tok, _ = load_model("embedded:smollm2")
    blocks, info = token_blocks(tok, DataSpec(split="valid", samples=a.samples, seq_len=a.seq_len), "calibration")
    cands = candidates(model, protect=["attn.0"])
    rows = {}
    engines = {
        "reuse": lambda: ModelScorer(model, blocks, a.batch_size, reuse_activations=True, progress=False),
        "no_reuse": lambda: ModelScorer(model, blocks, a.batch_size, reuse_activations=False, progress=False),
        "layer_major": lambda: LayerMajorScorer(InMemory(model), blocks, a.lm_batch_size, progress=False),
    }
    for name, make in engines.items():
        times = []
        for _ in range(a.repeats):
            s = make()
            t0 = time.perf_counter()
            got = s.score(frozenset(), cands)
            times.append(time.perf_counter() - t0)
            if name == "reuse":
                ref = got
        best = min(times)
        worst = max(abs(got[k] - ref[k]) / ref[k] for k in ref)
        rows[name] = {
            "seconds_per_step": round(best, 2), "all_seconds": [round(t, 2) for t in times],
            "candidates": len(cands), "candidate_evals_per_s": round(len(cands) / best, 3),
            "tokens_per_s": round(len(cands) * blocks.numel() / best, 1),
            "layer_passes_per_step": s.layer_passes,
            "max_rel_ppl_diff_vs_reuse": float(f"{worst:.2e}"),
            "batch_size": a.lm_batch_size if name == "layer_major" else a.batch_size,
        }
    rows["speedup_from_reuse"] = round(rows["no_reuse"]["seconds_per_step"] / rows["reuse"]["seconds_per_step"], 2)
    rows["layer_major_vs_reuse"] = round(rows["reuse"]["seconds_per_step"] / rows["layer_major"]["seconds_per_step"], 2)
    rows["measured"] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)", "data": info,
                        "dtype": "float32", "backend": f"torch {torch.__version__} CPU",
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                        "note": "one step = scoring all 59 unprotected sublayers of the dense model; best of repeats; "
                                "layer_passes = stream-layer passes for layer-major"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
