"""OUT/ablation.{json,md} and plots: PPL vs parameters removed, speedup vs PPL."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def winners(res: dict) -> dict:
    """Per target: lowest evaluation PPL, highest ideal decode speedup; and the speed/PPL Pareto front."""
    out: dict = {"ppl": {}, "speed": {}, "pareto": []}
    for t in res["targets"]:
        rows = [r for r in res["rows"] if r["target"] == t]
        if rows:
            out["ppl"][str(t)] = min(rows, key=lambda r: r["eval_ppl"])["variant"]
            out["speed"][str(t)] = max(rows, key=lambda r: r["decode_speedup_ideal"])["variant"]
    rows = res["rows"]
    for r in rows:
        dominated = any(o["eval_ppl"] <= r["eval_ppl"] and o["decode_speedup_ideal"] >= r["decode_speedup_ideal"]
                        and (o["eval_ppl"], o["decode_speedup_ideal"]) != (r["eval_ppl"], r["decode_speedup_ideal"])
                        for o in rows)
        if not dominated:
            out["pareto"].append(f"{r['variant']}@{r['target']:.0%}")
    return out


def _fmt_layers(xs: list[int]) -> str:
    return ",".join(map(str, xs)) or "-"


def markdown(res: dict) -> str:
    cal, ev, cm, sc = res["calibration"], res["eval"], res["cost_model"], res["scoring"]
    d = res["dense"]
    w = winners(res)
    lines = [
        f"# rtk ablation: {res['model']}",
        "",
        f"- Parameters: {res['params_total']:,} (embeddings and LM head counted); targets "
        f"{', '.join(f'{t:.0%}' for t in res['targets'])} of them removed.",
        f"- Calibration (search): {cal['file']} [{cal['split']}], {cal['samples']} x {cal['seq_len']} tokens. "
        f"Evaluation: {ev['file']} [{ev['split']}], {ev['samples']} x {ev['seq_len']} tokens "
        f"({ev['predicted_tokens']:,} predicted); {sc['dtype']}, torch on {sc['device']}.",
        f"- Ideal speedups are roofline estimates (rtk.cost) on {cm['hardware']}, bf16 weights/KV: "
        f"decode at batch {cm['batch']} x context {cm['context']} and at batch 1; prefill of one "
        f"{cm['context']}-token prompt. Not measured.",
        f"- Scoring: {sc['ppl_evaluations']} calibration PPL evaluations ({sc['cache_hits']} answered from the "
        f"shared cache) in {sc['seconds']} s this run, {sc['threads']} threads ({sc['machine']}).",
        "",
        f"Dense: eval PPL {d['eval_ppl']:.3f}, calibration PPL {d['calib_ppl']:.3f}.",
        "",
        f"| variant | target | params removed | eval PPL | calib PPL | attn removed | MLP removed | "
        f"decode x (B={cm['batch']}) | decode x (B=1) | prefill x | KV cache | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        b = r.get("bench")
        mark = "" if r.get("search_finished", True) else " (search unfinished)"
        lines.append(
            f"| {r['variant']}{mark} | {r['target']:.0%} | {r['params_removed_fraction']:.1%} | {r['eval_ppl']:.3f} | "
            f"{r['calib_ppl']:.3f} | {len(r['attn_removed'])} | {len(r['mlp_removed'])} | "
            f"{r['decode_speedup_ideal']:.3f} | {r['decode_speedup_ideal_b1']:.3f} | {r['prefill_speedup_ideal']:.3f} | "
            f"{r['kv_cache_ratio']:.0%} | {json.dumps(b) if b else '-'} |")
    lines += ["", "## Winners", ""]
    for t in res["targets"]:
        if str(t) in w["ppl"]:
            lines.append(f"- {t:.0%} removed: lowest eval PPL **{w['ppl'][str(t)]}**; highest ideal decode speedup "
                         f"**{w['speed'][str(t)]}**.")
    lines += [f"- Not dominated on (eval PPL, ideal decode speedup): {', '.join(w['pareto'])}.", "",
              "## What each variant removed", "",
              "| variant | target | attention layers | MLP layers | model |", "|---|---:|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['target']:.0%} | {_fmt_layers(r['attn_removed'])} | "
                     f"{_fmt_layers(r['mlp_removed'])} | {r['model_dir']} |")
    lines += ["", "## Variants", ""]
    for name, v in res["variants"].items():
        lines.append(f"- **{name}**: {v['label']} (candidates {v['candidates']}, {v['method']}, "
                     f"normalize {v['normalize']}, rank by {v['rank']}); order: {' '.join(v['order'])}")
    lines += ["", "![PPL vs parameters removed](ppl_vs_params.png)", "",
              "![ideal decode speedup vs PPL](speedup_vs_ppl.png)", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> None:
    by_var: dict[str, list] = {}
    for r in res["rows"]:
        by_var.setdefault(r["variant"], []).append(r)
    d = res["dense"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in by_var.items():
        xs = [0.0] + [100 * r["params_removed_fraction"] for r in rows]
        ys = [d["eval_ppl"]] + [r["eval_ppl"] for r in rows]
        ax.plot(xs, ys, marker="o", ms=4, label=name, ls="-" if "progressive" in name or name == "blocks-ppl" else "--")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(f"eval PPL ({res['eval']['split']}, log scale)")
    ax.set_title(f"{res['model']}: ablations", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_params.png", dpi=110)
    plt.close(fig)

    cm = res["cost_model"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in by_var.items():
        ax.plot([r["eval_ppl"] for r in rows], [r["decode_speedup_ideal"] for r in rows], marker="o", ms=4, label=name)
        for r in rows:
            ax.annotate(f"{r['target']:.0%}", (r["eval_ppl"], r["decode_speedup_ideal"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("eval PPL (log scale)")
    ax.set_ylabel(f"ideal decode speedup (roofline, B={cm['batch']}, ctx={cm['context']})")
    ax.set_title("speed vs quality (estimated speedup, not measured)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_ppl.png", dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> None:
    out = Path(out)
    res = {**res, "winners": winners(res)}
    (out / "ablation.json").write_text(json.dumps(res, indent=1))
    (out / "ablation.md").write_text(markdown(res))
    plots(res, out)
