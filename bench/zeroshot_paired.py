"""Is the method's zero-shot lead real? Issue 31's main measurement, for bench/RESULTS.md "Zero-shot after the
demo's healing, paired".

Three SmolLM2-135M plans at 20% (each removes 8 attention + 8 MLP sublayers), rebuilt from their recorded plans
(no search), each healed by `rtk heal` at its defaults (the demo's: 61,440 tokens of WikiText-2 valid, full KD,
lr 1e-3, seed 0), then measured by one `rtk bench` run on the same documents: the method as --baseline, the two
whole-layer plans as --candidate, lm-eval (`hf`, fp32, batch 8) on the first N documents of PIQA, ARC-Easy and
WinoGrande, and WikiText-2 test PPL. rtk bench writes every per-document result and the paired intervals
against the baseline; this script adds the candidates' interval against each other (rtk.paired) in paired.json.

    .venv/bin/python bench/zeroshot_paired.py -o runs/zeroshot-paired [--limit 1000] [--threads 2]

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
PLANS = {
    "method": REPO / "bench" / "results" / "demo-2026-12-03" / "prune" / "plan.json",
    "blocks-kl": REPO / "bench" / "results" / "select-20" / "heal-61k" / "blocks-kl" / "plan.json",
    "blocks-bi": REPO / "bench" / "results" / "select-20" / "heal-61k" / "blocks-bi" / "plan.json",
}
TASKS = "piqa,arc_easy,winogrande"


def rebuild(name: str, root: Path) -> Path:
    """The recorded plan's removals applied to the original and exported as rtk prune exports them."""
    out = root / f"{name}-pruned"
    if (out / "model" / "config.json").is_file():
        return out
    from rtk.export.safetensors import export_model
    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan

    recorded = json.loads(PLANS[name].read_text())
    plan = {k: recorded[k] for k in ("model", "removed_sublayers", "params_total", "params_removed")
            if k in recorded}
    model, tok, path = load_model(plan["model"], "float32", "cpu")
    pruned = apply_plan(model, plan["removed_sublayers"])
    plan["model_path"] = path
    plan["rebuilt_from"] = str(PLANS[name].relative_to(REPO))
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
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rtk = [sys.executable, "-m", "rtk"]
    times = json.loads((a.out / "times.json").read_text()) if (a.out / "times.json").is_file() else {}
    healed = {}
    for name in PLANS:
        pruned = rebuild(name, a.out)
        healed[name] = a.out / f"{name}-healed"
        if not (healed[name] / "plan.json").is_file():
            times[f"heal {name}"] = run(rtk + ["heal", str(pruned), "-o", str(healed[name]), "--threads",
                                               str(a.threads), "--quiet"], a.out / f"heal-{name}.log")
            (a.out / "times.json").write_text(json.dumps(times, indent=1))
    bench = a.out / "bench"
    if not (bench / "bench.json").is_file():
        model = {name: str(folder / "model") for name, folder in healed.items()}  # rtk heal -o OUT writes OUT/model
        times["bench"] = run(rtk + ["bench", "--baseline", model["method"],
                                    "--candidate", model["blocks-kl"], "--candidate", model["blocks-bi"],
                                    "--tasks", TASKS, "--limit", str(a.limit), "--skip", "speed",
                                    "--threads", str(a.threads), "-o", str(bench)], a.out / "bench.log")
        (a.out / "times.json").write_text(json.dumps(times, indent=1))
    pairs(bench, a.out)
    print(json.dumps(times, indent=1))


def pairs(bench: Path, out: Path) -> None:
    """Every pair of the three healed models on the same documents and blocks (rtk.bench.metrics.paired_quality,
    what rtk bench gives each candidate against the baseline): paired.json, and a table on stdout."""
    from rtk.bench.metrics import paired_quality

    res = json.loads((bench / "bench.json").read_text())
    names = ["method", "blocks-kl", "blocks-bi"]  # baseline, candidate1, candidate2: the order rtk bench ran them
    q = {n: m["quality"] for n, m in zip(names, res["models"])}
    got = {f"{x} - {y}": paired_quality(q[x], q[y])
           for x, y in (("method", "blocks-kl"), ("method", "blocks-bi"), ("blocks-kl", "blocks-bi"))}
    (out / "paired.json").write_text(json.dumps(got, indent=1))
    for pair, rows in got.items():
        for k, r in rows.items():
            print(f"{pair:22s} {k:22s} {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] {r['verdict']}")


if __name__ == "__main__":
    main()
