"""Is the method's zero-shot lead real? Issue 31's main measurement, for bench/RESULTS.md "Zero-shot after the
demo's healing, paired" (SmolLM2) and "Gemma 3 270M, paired" (--model gemma3-270m).

Three SmolLM2-135M plans at 20% (each removes 8 attention + 8 MLP sublayers), rebuilt from their recorded plans
(no search), each healed by `rtk heal` at its defaults (the demo's: 61,440 tokens of WikiText-2 valid, full KD,
lr 1e-3, seed 0), then measured by one `rtk bench` run on the same documents: the method as --baseline, the two
whole-layer plans as --candidate, lm-eval (`hf`, fp32, batch 8) on the first N documents of PIQA, ARC-Easy and
WinoGrande, and WikiText-2 test PPL. rtk bench writes every per-document result and the paired intervals
against the baseline; this script adds the candidates' interval against each other (rtk.paired) in paired.json.

    .venv/bin/python bench/zeroshot_paired.py -o runs/zeroshot-paired [--limit 1000] [--threads 2]

--model gemma3-270m: Gemma 3 270M at 20%, the method (params-progressive), blocks-ppl and blocks-kl, rebuilt from
bench/results/gemma3-270m/ablation.json, each healed with that recipe's heal: section (12,800 tokens, lr 1e-4, the
settings of its `rtk ablate --heal`), and measured on the first 500 documents a task by default.

Run it alone on the machine. Each step is skipped when its output is there, so rerunning resumes.
The documents reported here (the first 1,000) never meet select's judge documents (the last 200 of each task).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GEMMA = REPO / "bench" / "results" / "gemma3-270m"
SETUPS = {  # baseline first: rtk bench's --baseline, then its --candidates in this order
    "smollm2": {
        "plans": {
            "method": REPO / "bench" / "results" / "demo-2026-12-03" / "prune" / "plan.json",
            "blocks-kl": REPO / "bench" / "results" / "select-20" / "heal-61k" / "blocks-kl" / "plan.json",
            "blocks-bi": REPO / "bench" / "results" / "select-20" / "heal-61k" / "blocks-bi" / "plan.json",
        },
        "heal": [],  # rtk heal's defaults: the demo's
        "limit": 1000,
    },
    "gemma3-270m": {
        "plans": {  # (ablation record, its variant)
            "method": (GEMMA / "ablation.json", "params-progressive"),
            "blocks-ppl": (GEMMA / "ablation.json", "blocks-ppl"),
            "blocks-kl": (GEMMA / "ablation.json", "blocks-kl"),
        },
        "heal": ["--config", str(GEMMA / "recipe.yaml")],  # its heal: section, as its rtk ablate --heal ran
        "limit": 500,
    },
}
TASKS = "piqa,arc_easy,winogrande"


def recorded_plan(source) -> dict:
    """The removals and sizes of a plan.json, or of one variant row of an rtk ablate record."""
    keys = ("model", "removed_sublayers", "params_total", "params_removed")
    if isinstance(source, tuple):
        record, variant = source
        ab = json.loads(record.read_text())
        row = next(r for r in ab["rows"] if r["variant"] == variant)
        return {"model": ab["model"], "removed_sublayers": row["removed"], "params_total": ab["params_total"],
                "params_removed": row["params_removed"],
                "rebuilt_from": f"{record.relative_to(REPO)} variant {variant}"}
    recorded = json.loads(source.read_text())
    return {**{k: recorded[k] for k in keys if k in recorded}, "rebuilt_from": str(source.relative_to(REPO))}


def rebuild(name: str, source, root: Path) -> Path:
    """The recorded plan's removals applied to the original and exported as rtk prune exports them."""
    out = root / f"{name}-pruned"
    if (out / "model" / "config.json").is_file():
        return out
    from rtk.export.safetensors import export_model
    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan

    plan = recorded_plan(source)
    model, tok, path = load_model(plan["model"], "float32", "cpu")
    pruned = apply_plan(model, plan["removed_sublayers"])
    plan["model_path"] = path
    tmp = root / f"{name}-pruned.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_model(pruned, tok, tmp / "model", original=model, plan=plan, source=path)
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
    tmp.rename(out)
    return out


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--model", choices=sorted(SETUPS), default="smollm2")
    ap.add_argument("--limit", type=int, help="documents a task (default: 1000 for smollm2, 500 for gemma3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    setup = SETUPS[a.model]
    limit = a.limit or setup["limit"]
    a.out.mkdir(parents=True, exist_ok=True)
    rtk = [sys.executable, "-m", "rtk"]
    times = json.loads((a.out / "times.json").read_text()) if (a.out / "times.json").is_file() else {}
    healed = {}
    for name, source in setup["plans"].items():
        pruned = rebuild(name, source, a.out)
        healed[name] = a.out / f"{name}-healed"
        if not (healed[name] / "plan.json").is_file():
            times[f"heal {name}"] = run(rtk + ["heal", str(pruned), "-o", str(healed[name]), *setup["heal"],
                                               "--threads", str(a.threads), "--quiet"], a.out / f"heal-{name}.log")
            (a.out / "times.json").write_text(json.dumps(times, indent=1))
    bench = a.out / "bench"
    if not (bench / "bench.json").is_file():
        model = [str(folder / "model") for folder in healed.values()]  # rtk heal -o OUT writes OUT/model
        candidates = [arg for m in model[1:] for arg in ("--candidate", m)]
        times["bench"] = run(rtk + ["bench", "--baseline", model[0], *candidates,
                                    "--tasks", TASKS, "--limit", str(limit), "--skip", "speed",
                                    "--threads", str(a.threads), "-o", str(bench)], a.out / "bench.log")
        (a.out / "times.json").write_text(json.dumps(times, indent=1))
    pairs(bench, a.out, list(setup["plans"]))
    print(json.dumps(times, indent=1))


def pairs(bench: Path, out: Path, names: list[str]) -> None:
    """Every pair of the three healed models on the same documents and blocks (rtk.bench.metrics.paired_quality,
    what rtk bench gives each candidate against the baseline): paired.json, and a table on stdout."""
    from itertools import combinations

    from rtk.bench.metrics import paired_quality

    res = json.loads((bench / "bench.json").read_text())
    q = {n: m["quality"] for n, m in zip(names, res["models"])}  # baseline, candidates: the order rtk bench ran
    got = {f"{x} - {y}": paired_quality(q[x], q[y]) for x, y in combinations(names, 2)}
    (out / "paired.json").write_text(json.dumps(got, indent=1))
    for pair, rows in got.items():
        for k, r in rows.items():
            print(f"{pair:22s} {k:22s} {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] {r['verdict']}")


if __name__ == "__main__":
    main()
