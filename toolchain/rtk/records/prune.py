"""OUT/report.md and its plots (RI/NRI heatmap, PPL along the search)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rtk.records.names import counted_text  # noqa: E402


def _heatmap(plan: dict, out: Path) -> str:
    step0 = plan["steps"][0]["scores"]
    n_layers = max(int(n.split(".")[1]) for n in plan["removed_sublayers"] + list(step0)) + 1
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3, n_layers * 0.22 + 1)))
    for ax, key, title in ((axes[0], "ri", "RI (relative PPL change)"), (axes[1], "nri", "NRI (RI / params)")):
        grid = np.full((n_layers, 2), np.nan)
        for name, s in step0.items():
            kind, i = name.split(".")
            if kind in ("attn", "mlp"):
                grid[int(i), 0 if kind == "attn" else 1] = s[key]
            else:
                grid[int(i), :] = s[key]
        finite = grid[np.isfinite(grid)]
        vmax = np.percentile(np.abs(finite), 95) if finite.size else 1.0
        im = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-vmax, vmax=vmax)
        ax.set_xticks([0, 1], ["attn", "mlp"])
        ax.set_ylabel("layer")
        ax.set_title(title + " at step 0\n(colour clipped at the 95th percentile of |value|)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
        for e in plan["removed"]:
            cols = [0, 1] if e["kind"] == "layer" else [0 if e["kind"] == "attn" else 1]
            for c in cols:
                ax.text(c, e["layer"], "x", ha="center", va="center", fontsize=7)
    fig.suptitle(f"{plan['model']}: sublayer impact (x = removed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ri_heatmap.png", dpi=110)
    plt.close(fig)
    return "ri_heatmap.png"


def _ppl_curve(plan: dict, out: Path) -> str:
    total = plan["params_total"]
    xs, ys, acc = [0.0], [plan["ppl_base"]], 0
    for e in plan["removed"]:
        acc += e["params"]
        xs.append(100 * acc / total)
        ys.append(e["ppl_after"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", ms=3)
    for x, y, e in zip(xs[1:], ys[1:], plan["removed"]):
        ax.annotate(e["name"], (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("calibration PPL")
    ax.set_title(f"{plan['recipe']['search']['method']} search, normalize={plan['recipe']['search']['normalize']}, "
                 f"criterion {plan['recipe']['search'].get('criterion', 'ppl')}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ppl_curve.png", dpi=110)
    plt.close(fig)
    return "ppl_curve.png"


def target_text(target: dict) -> str:
    """The stop rule as the recipe says it (`params_removed: 0.2`), without the unset alternatives (and without
    `count: all`, the default every recipe before it had)."""
    return ", ".join(f"{k}: {v}" for k, v in target.items()
                     if v is not None and not (k == "count" and v == "all")) or "none"


def write_report(plan: dict, out: Path, criterion: str) -> None:
    """OUT/report.md and its plots; `criterion`: the search's criterion as its table says it
    (rtk.prune.criteria.describe)."""
    out = Path(out)
    step0 = (plan.get("steps") or [{}])[0].get("scores", {})
    heat = _heatmap(plan, out) if step0 and all("ri" in v for v in step0.values()) else None
    curve = _ppl_curve(plan, out)
    ev, cal = plan["eval"], plan["calibration"]
    n_attn = sum(e["kind"] in ("attn", "layer") for e in plan["removed"])
    n_mlp = sum(e["kind"] in ("mlp", "layer") for e in plan["removed"])
    lines = [
        f"# rtk prune report: {plan['model']}",
        "",
        f"- Parameters: {plan['params_total']:,} -> {plan['params_after']:,} "
        f"({plan['params_removed_fraction']:.1%} of all removed; {counted_text(plan)})",
        f"- Removed: {len(plan['removed'])} candidates ({n_attn} attention, {n_mlp} MLP sublayers)",
        f"- Search: {plan['recipe']['search']['method']}, normalize={plan['recipe']['search']['normalize']}, "
        f"criterion {criterion}, target {target_text(plan['recipe']['search']['target'])}, "
        f"protect {', '.join(plan['recipe']['search']['protect']) or 'nothing'}",
        *([_speed_line(plan["speed"])] if plan.get("speed") else []),
        *(selection_lines(plan["selection"], out) if plan.get("selection") else []),
        "",
        "| perplexity | base | pruned | change | measured on |",
        "|---|---:|---:|---:|---|",
        f"| calibration | {plan['ppl_base']:.3f} | {plan['ppl_final']:.3f} | "
        f"{plan['ppl_final'] / plan['ppl_base'] - 1:+.1%} | {cal['measured']} |",
        f"| evaluation | {ev['ppl_base']:.3f} | {ev['ppl_final']:.3f} | "
        f"{ev['ppl_final'] / ev['ppl_base'] - 1:+.1%} | {ev['measured']} |",
        "",
        "## Removal order",
        "",
        "| # | sublayer | params | RI | NRI | calibration PPL after |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k, e in enumerate(plan["removed"], 1):
        ri = "-" if e.get("ri") is None else f"{e['ri']:+.4f}"
        nri = "-" if e.get("nri") is None else f"{e['nri']:+.3e}"
        lines.append(f"| {k} | {e['name']} | {e['params']:,} | {ri} | {nri} | {e['ppl_after']:.3f} |")
    sc = plan["scoring"]
    lines += [
        "",
        f"Scoring: {sc['candidate_evaluations']} PPL evaluations in {sc['seconds']} s "
        f"({_engine_line(sc)}); whole run {plan['wall_seconds']} s.",
        "",
        *([f"![RI heatmap]({heat})", ""] if heat else []),
        f"![PPL along the search]({curve})",
        "",
    ]
    if plan.get("heal"):
        from rtk.records.heal import report_lines

        lines += report_lines(plan, out)
    (out / "report.md").write_text("\n".join(lines))


def _selection_plot(sel: dict, out: Path) -> str:
    """Judge PPL of every proposal before healing, and of the finalists after the brief healing."""
    props = sel["proposals"]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(props) + 2), 3.6))
    xs = np.arange(len(props))
    ax.bar(xs - 0.2, [p["judge_ppl_before"] for p in props], 0.4, label="before healing")
    ax.bar(xs + 0.2, [p.get("judge_ppl_after", np.nan) for p in props], 0.4, label="after the brief healing")
    ax.set_xticks(xs, [("* " if p["name"] == sel["winner"] else "") + p["name"] for p in props], rotation=30,
                  ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("judge PPL (held-out)")
    ax.set_title("plans proposed (* = kept)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=110)
    plt.close(fig)
    return "selection.png"


def decision_lines(sel: dict) -> list[str]:
    """How the winner was decided: a clear lead on the judge, or a tie decided by speed; each finalist's
    difference to the best with its paired 95% interval."""
    d = sel.get("decision")
    if not d:
        return []
    if d["tie"]:
        others = [n for n in d["tied"] if n != d["best_on_judge"]]
        head = (f"**A tie**: {d['best_on_judge']} is best on the judge, but its lead over {', '.join(others)} is "
                f"inside the paired 95% interval (no difference shown); of the tied finalists "
                f"({', '.join(d['tied'])}) the fastest, **{d['winner']}**, wins.")
    else:
        head = f"No tie: {d['best_on_judge']}'s lead over every other finalist is outside the paired 95% interval."
    lines = ["", head, "", f"Best on the judge minus each other finalist ({d['paired_rule']}):", "",
             "| finalist | best - finalist [95% interval] | best is | tied |", "|---|---|---|---|"]
    for name, p in d["leads"].items():
        lines.append(f"| {name} | {p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] | {p['verdict']} | "
                     f"{'yes' if name in d['tied'] else 'no'} |")
    return lines


def _judge_text(sel: dict) -> str:
    """What judged the finalists: the held-out text, or the tasks' documents and which may report."""
    j = sel["judge"]
    text = (f"{j['text']}, {j['samples']} blocks x {j['seq_len']} tokens, held out from "
            f"{', '.join(j.get('held_out_from') or []) or 'nothing else'} (never the evaluation text)")
    if j.get("kind") != "tasks":
        return "Judge: " + text
    docs = "; ".join(f"{t} documents {r['judge_documents'][0]}-{r['judge_documents'][1]} of {r['of']}"
                     for t, r in j["tasks"].items())
    return (f"Judge: lm-eval {j['metric']} (zero-shot) on {docs}; the documents that report are {j['reporting']}, "
            f"never the judge's. Proposals ranked before healing on {text}")


def selection_lines(sel: dict, out: Path) -> list[str]:
    """recipe select:: every plan proposed, the finalists' judge PPLs (and task scores) before and after the brief
    healing, and how the winner was decided."""
    h = sel["heal"]
    tasks = sel["judge"].get("kind") == "tasks"
    lines = ["", "## Selection: plans judged after healing", "",
             f"Winner: **{sel['winner']}**. Rule: {sel['rule']}. {_judge_text(sel)}. Brief healing: {h['method']}, "
             f"{h['tokens']:,} tokens of {sel['heal_data']['text']}, seed {h['seed']}.", "",
             "| plan | family | criterion | params removed | predicted speedup | calibration PPL | judge PPL | "
             "finalist | judge PPL healed |" + (" judge score healed |" if tasks else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if tasks else "")]
    for p in sel["proposals"]:
        fin = p.get("finalist")
        healed = f"{p['judge_ppl_after']:.3f}" if fin else ("same plan as " + p["same_as"] if p.get("same_as") else "-")
        name = f"**{p['name']}**" if p["name"] == sel["winner"] else p["name"]
        lines.append(f"| {name} | {p['family']} | {p['criterion']} | {p['params_removed_fraction']:.1%} | "
                     f"{p['predicted_speedup']:.3f}x | {p['calibration_ppl']:.3f} | {p['judge_ppl_before']:.3f} | "
                     f"{fin or '-'} | {healed} |" + (f" {p['judge_score']:.3f} |" if fin and tasks else
                                                     " - |" if tasks else ""))
    return lines + decision_lines(sel) + ["", f"![judge PPL of every plan]({_selection_plot(sel, out)})"]


def _speed_line(sp: dict) -> str:
    """The predicted speedup and what predicted it (plan.json's speed record)."""
    how = (f"measured profile of {sp['engine']} on {sp['machine']}, {sp['workload']}" if sp["model"] != "roofline"
           else f"roofline, {sp['phase']} at batch {sp['batch']} x context {sp['context']}, {sp['hardware']}")
    target = f" (target {sp['target']:g}x)" if sp.get("target") else ""
    return f"- Predicted speedup: {sp['predicted_speedup']:.3f}x{target}; {how}; not a measurement"


def _engine_line(sc: dict) -> str:
    """How the PPLs were computed, from plan.json's scoring record."""
    engine = sc.get("engine", "per-candidate")
    parts = [f"{engine} engine", f"{sc.get('device', 'cpu')}, {sc.get('dtype', 'float32')}",
             f"{sc['threads']} threads"]
    if engine == "per-candidate":
        parts.append(f"activation reuse {'on' if sc.get('reuse_activations', True) else 'off'}")
    else:
        parts.append(f"stream budget {sc.get('memory')}, streams on {sc.get('streams')}")
    if sc.get("offload", "none") != "none":
        parts.append(f"weights offloaded to {sc['offload']}")
    if sc.get("workers", 1) > 1:
        parts.append(f"{sc['workers']} Ray workers")
    return "; ".join(parts)
