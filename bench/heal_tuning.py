"""Tuning runs for `rtk heal`'s defaults: the demo plan healed with different settings, evaluation PPL along
the way (rtk.heal.trainer with an evaluate callback, the same loop `rtk heal` runs).

    python bench/heal_tuning.py runs/smollm2-demo --tokens 25600 -o bench/results/heal/tuning.json \\
        [--only NAME,...] [--set NAME='{"lr": 5e-4}']

Teacher: the plan's original model; student: PRUNED_DIR/model; training text WikiText-2 *valid* (blocks of
256 tokens, the pool the budget needs); evaluation WikiText-2 *test*, the plan's 32 x 256 blocks, float32,
torch on the CPU. Each finished run is saved in the JSON at once (a rerun skips it). Runs, in order:
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

PLAIN = {"lr": 3e-4, "ce_weight": 0.0, "train_embeddings": True}  # HealConfig's defaults until 2026-12-02
LORA = {"method": "lora", "lora": {"rank": 64, "alpha": 128}, "ce_weight": 0.0}
RUNS = {  # name -> heal settings (full, KL at T=1, warm-up 5% + cosine, 4 x 256 per step unless set)
    "probe": {**PLAIN, "lr": 1e-4, "warmup": 0.0, "min_lr": 1.0, "max_grad_norm": None},  # issue 12's naive probe
    "full-lr3e-4": PLAIN,
    "full-lr1e-3": {**PLAIN, "lr": 1e-3},
    "full-lr1e-3-mb2": {**PLAIN, "lr": 1e-3, "micro_batch": 2},
    "full-lr1e-3-noemb": {**PLAIN, "lr": 1e-3, "train_embeddings": False},
    "full-lr1e-3-T2": {**PLAIN, "lr": 1e-3, "temperature": 2.0},
    "full-lr1e-3-ce0.5": {**PLAIN, "lr": 1e-3, "ce_weight": 0.5},
    "lora-r64-lr2e-3": {**LORA, "lr": 2e-3},
    "lora-r64-lr4e-3": {**LORA, "lr": 4e-3},
    "lora-r64-lr2e-3-ce0.5": {**LORA, "lr": 2e-3, "ce_weight": 0.5},
    "noemb-hid1": {**PLAIN, "lr": 1e-3, "train_embeddings": False, "hidden_weight": 1.0},
    "noemb-ce0.5": {**PLAIN, "lr": 1e-3, "train_embeddings": False, "ce_weight": 0.5},  # the defaults since
    "noemb-ce0.5-hid1": {**PLAIN, "lr": 1e-3, "train_embeddings": False, "ce_weight": 0.5, "hidden_weight": 1.0},
    "noemb-lr2e-3-ce0.5": {**PLAIN, "lr": 2e-3, "train_embeddings": False, "ce_weight": 0.5},
    "noemb-ce1": {**PLAIN, "lr": 1e-3, "train_embeddings": False, "ce_weight": 1.0},
}
__doc__ += "".join(f"\n- {k}: {v}" for k, v in RUNS.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pruned_dir", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=38_400)
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="also evaluate every this many training tokens (default: at the end only)")
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument("--set", action="append", default=[], help="NAME=JSON: an extra run")
    args = ap.parse_args()

    from rtk.data import token_blocks
    from rtk.heal.trainer import distill
    from rtk.heal.run import heal_blocks, locate, teacher_spec
    from rtk.model.ppl import model_ppl
    from rtk.model.load import load_model
    from rtk.data import DataSpec
    from rtk.heal.config import HealConfig

    runs = dict(RUNS)
    for kv in args.set:
        name, _, js = kv.partition("=")
        runs[name] = json.loads(js)
    names = args.only.split(",") if args.only else list(runs)
    model_dir, plan = locate(args.pruned_dir)
    teacher, tok, _ = load_model(teacher_spec(plan, None, args.pruned_dir))
    student0, _, _ = load_model(str(model_dir))
    evalb, eval_info = token_blocks(tok, DataSpec(**plan["recipe"]["data"]["evaluation"]), "evaluation")
    done = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    done["how"] = (f"teacher {plan['model']}, student {model_dir}; training text WikiText-2 valid, 256-token "
                   f"blocks; evaluation {eval_info['text']} {eval_info['samples']} x {eval_info['seq_len']}; "
                   f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with light jobs)")
    ppl0 = done.get("ppl_before") or model_ppl(student0, evalb)
    done["ppl_before"] = ppl0
    for name in names:
        if name in done["runs"]:
            print(f"{name}: done before, final PPL {done['runs'][name]['ppl_final']:.2f}")
            continue
        cfg = HealConfig(**{"tokens": args.tokens, **runs[name]})
        blocks, _ = heal_blocks(tok, cfg.data, cfg.tokens)
        per_step = cfg.micro_batch * cfg.grad_accum * cfg.data.seq_len
        cfg = cfg.model_copy(update={"eval_every": max(1, (args.eval_tokens or cfg.tokens) // per_step)})
        t0 = time.perf_counter()
        healed, rec = distill(copy.deepcopy(student0), teacher, blocks, cfg, None, name, progress=True,
                              evaluate=lambda m: model_ppl(m, evalb))
        curve = [[0, ppl0]] + [[e["tokens"], e["ppl"]] for e in rec["history"]["evals"]]
        done["runs"][name] = {"settings": runs[name], "config": cfg.model_dump(mode="json"), "curve": curve,
                              "ppl_final": curve[-1][1], "tokens": rec["tokens"],
                              "tokens_per_second": rec["tokens_per_second"], "train_seconds": rec["train_seconds"],
                              "wall_seconds": round(time.perf_counter() - t0, 1),
                              "loss": [[s["tokens"], s["loss"]] for s in rec["history"]["steps"]]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(args.out)
        print(f"{name}: PPL " + " -> ".join(f"{p:.2f}@{t // 1000}k" for t, p in curve)
              + f"; {rec['tokens_per_second']:.0f} tokens/s", flush=True)
        del healed


if __name__ == "__main__":
    sys.exit(main())
