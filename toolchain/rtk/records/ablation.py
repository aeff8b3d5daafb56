"""OUT/ablation.{json,md} and plots: PPL vs parameters removed, speedup vs PPL."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rtk.records.heal import settings_line  # noqa: E402
from rtk.outdir import replace_atomic  # noqa: E402


def winners(res: dict) -> dict:
    """Per target: lowest evaluation PPL, highest ideal decode speedup; and the speed/PPL Pareto front."""
    out: dict = {"ppl": {}, "speed": {}, "pareto": []}
    for t in res["targets"]:
        rows = [r for r in res["rows"] if r["target"] == t]
        if rows:
            out["ppl"][str(t)] = min(rows, key=lambda r: r["eval_ppl"])["variant"]
            out["speed"][str(t)] = max(rows, key=lambda r: r["decode_speedup_ideal"])["variant"]
    rows = res["rows"]
    out["pareto"] = front(rows, lambda r: r["decode_speedup_ideal"])
    if any(r.get("healed") for r in rows):
        out["healed_ranking"] = heal_ranking(res)
        if best := healed_zero_shot_best(res):
            out["healed_zero_shot"] = best
    mrows = [r for r in rows if math.isfinite(measured(r))]
    if mrows:
        out["measured_pareto"] = front(mrows, measured)
        out["equal_measured_speed"] = equal_speed(res)
        others = [x["name"] for x in res.get("bench_config", {}).get("workloads", []) if x["name"] != MEASURED]
        out["equal_measured_speed_other"] = {w: equal_speed(res, workload=w) for w in others}
        for t in res["targets"]:
            rt = [r for r in mrows if r["target"] == t]
            if rt:
                out.setdefault("measured_speed", {})[str(t)] = max(rt, key=measured)["variant"]
                zs = [r for r in rt if math.isfinite(zero_shot_avg(r))]
                if zs:
                    out.setdefault("zero_shot", {})[str(t)] = max(zs, key=zero_shot_avg)["variant"]
    return out


def front(rows: list[dict], speed) -> list[str]:
    """'variant@target' of the rows no other row beats on both eval PPL (lower) and `speed(row)` (higher)."""
    key = [(r["eval_ppl"], speed(r)) for r in rows]
    return [f"{r['variant']}@{r['target']:.0%}" for r, (p, v) in zip(rows, key)
            if not any(q <= p and u >= v and (q, u) != (p, v) for q, u in key)]


MEASURED = "short"  # the workload whose tokens/s speedup decides "equal measured speed"


def measured(r: dict, workload: str = MEASURED, what: str = "throughput") -> float:
    """Median served speedup of a row (rtk ablate --bench), NaN where not measured."""
    try:
        return float(r["bench"]["served"]["speedup"][workload][what]["median"])
    except (KeyError, TypeError):
        return math.nan


def zero_shot_avg(r: dict) -> float:
    """A row's (or a row's `healed` record's) measured zero-shot average, NaN where not measured."""
    try:
        return float(r["bench"]["zero_shot"]["avg_acc"])
    except (KeyError, TypeError):
        return math.nan


def ppl_at_speed(points: list[tuple[float, float]], speed: float) -> float:
    """log-linear interpolation of PPL at a measured speedup along one variant's points
    [(speedup, ppl)] (the dense model is (1, dense PPL)); NaN outside the points' range."""
    pts = sorted(points)
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if s0 <= speed <= s1:
            if s1 == s0:
                return min(p0, p1)
            f = (speed - s0) / (s1 - s0)
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    return math.nan


def equal_speed(res: dict, speeds=(1.05, 1.10, 1.15, 1.20, 1.25, 1.30, 1.40, 1.50), workload: str = MEASURED) -> dict:
    """Per measured speedup (`workload` tokens/s): each variant's eval PPL interpolated along its
    efficient points (dense included; a point slower and worse than another of the same variant is
    dropped) and the lowest, where >= 2 variants reach that speed."""
    by_var: dict[str, list] = {}
    for r in res["rows"]:
        if math.isfinite(measured(r, workload)):
            by_var.setdefault(r["variant"], [(1.0, res["dense"]["eval_ppl"])]).append(
                (measured(r, workload), r["eval_ppl"]))
    # a point another point of the same variant beats on both speed and PPL is not on its curve
    by_var = {v: [a for a in pts if not any(b != a and b[0] >= a[0] and b[1] <= a[1] for b in pts)]
              for v, pts in by_var.items()}
    out = {}
    for sp in speeds:
        got = {v: ppl_at_speed(pts, sp) for v, pts in by_var.items()}
        got = {v: p for v, p in got.items() if math.isfinite(p)}
        if len(got) >= 2:
            out[f"{sp:.2f}"] = {"ppl": got, "winner": min(got, key=got.get)}
    return out


def _fmt_layers(xs: list[int]) -> str:
    return ",".join(map(str, xs)) or "-"


def markdown(res: dict) -> str:
    """ablation.md: the variants' table, healing and measured sections, winners, what each removed, plots."""
    w = winners(res)
    healed = any(r.get("healed") for r in res["rows"])
    lines = _summary_lines(res, healed)
    lines += healed_section(res)
    lines += measured_section(res, w)
    lines += paired_section(res)
    return "\n".join(lines + _winner_lines(res, w) + _variant_lines(res, w, healed))


def _summary_lines(res: dict, healed: bool) -> list[str]:
    """The run's settings, the dense model and one row per variant (eval PPL, ideal speedups)."""
    cal, ev, cm, sc = res["calibration"], res["eval"], res["cost_model"], res["scoring"]
    d = res["dense"]
    c = res.get("params_counted") or {"count": "all"}
    counted = (f"the {c['total']:,} non-embedding ones (embedding and LM head left out)" if c["count"] == "non_embedding"
               else "them (embeddings and LM head counted)")
    lines = [
        f"# rtk ablation: {res['model']}",
        "",
        f"- Parameters: {res['params_total']:,}; targets {', '.join(f'{t:.0%}' for t in res['targets'])} of "
        f"{counted} removed.",
        f"- Calibration (search): {cal['file']} [{cal['split']}], {cal['samples']} x {cal['seq_len']} tokens. "
        f"Evaluation: {ev['file']} [{ev['split']}], {ev['samples']} x {ev['seq_len']} tokens "
        f"({ev['predicted_tokens']:,} predicted); {sc['dtype']}, torch on {sc['device']}.",
        f"- Ideal speedups are roofline estimates (rtk.model.cost) on {cm['hardware']}, bf16 weights/KV: "
        f"decode at batch {cm['batch']} x context {cm['context']} and at batch 1; prefill of one "
        f"{cm['context']}-token prompt. Not measured.",
        f"- Scoring: {sc['ppl_evaluations']} calibration PPL evaluations ({sc['cache_hits']} answered from the "
        f"shared cache) in {sc['seconds']} s this run, {sc['threads']} threads ({sc['machine']})"
        + (f"; KL variants: {res['scoring_kl']['kl_evaluations']} KL evaluations "
           f"({res['scoring_kl']['cache_hits']} from their cache) in {res['scoring_kl']['seconds']} s."
           if res.get("scoring_kl") else "."),
        "",
        f"Dense: eval PPL {d['eval_ppl']:.3f}, calibration PPL {d['calib_ppl']:.3f}.",
        "",
        "| variant | target | params removed | eval PPL |" + (" PPL after healing |" if healed else "")
        + f" calib PPL | attn removed | MLP removed | "
        f"decode x (B={cm['batch']}) | decode x (B=1) | prefill x | KV cache |",
        "|---|---:|---:|---:|" + ("---:|" if healed else "") + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        mark = "" if r.get("search_finished", True) else " (search unfinished)"
        after = (f" {r['healed']['eval_ppl']:.3f} |" if r.get("healed") else " - |") if healed else ""
        lines.append(
            f"| {r['variant']}{mark} | {r['target']:.0%} | {r['params_removed_fraction']:.1%} | {r['eval_ppl']:.3f} |"
            f"{after} {r['calib_ppl']:.3f} | {len(r['attn_removed'])} | {len(r['mlp_removed'])} | "
            f"{r['decode_speedup_ideal']:.3f} | {r['decode_speedup_ideal_b1']:.3f} | {r['prefill_speedup_ideal']:.3f} | "
            f"{r['kv_cache_ratio']:.0%} |")
    return lines


def lead_text(res: dict, kind: str, target, best: str | None) -> str:
    """' (over RUNNER-UP: +d [low, high], verdict)': a winner's lead on the same blocks / documents, where known."""
    p = res.get("leads", {}).get(kind, {}).get(str(target))
    if not p or p["best"] != best:
        return ""
    return f" (over {p['runner_up']}: {p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}], {p['verdict']})"


def _winner_lines(res: dict, w: dict) -> list[str]:
    """## Winners per target: eval PPL, ideal and measured speed, zero-shot (each lead with its paired interval
    over the runner-up, where known), the Pareto sets."""
    lines = ["", "## Winners", ""]
    if res.get("leads"):
        lines += ["A lead in brackets is the winner minus the runner-up on the same blocks or documents, with its "
                  "paired 95% interval: only \"better\" says the lead is real.", ""]
    for t in res["targets"]:
        if str(t) in w["ppl"]:
            lines.append(f"- {t:.0%} removed: lowest eval PPL **{w['ppl'][str(t)]}**"
                         f"{lead_text(res, 'ppl', t, w['ppl'][str(t)])}; highest ideal decode speedup "
                         f"**{w['speed'][str(t)]}**.")
    for t, v in w.get("measured_speed", {}).items():
        zs = w.get("zero_shot", {}).get(t)
        lines.append(f"- {float(t):.0%} removed: highest measured speedup (vLLM, {MEASURED} workload, tokens/s) "
                     f"**{v}**; best zero-shot average **{zs or '-'}**{lead_text(res, 'zero_shot', t, zs)}.")
    for wl, eq in [(MEASURED, w.get("equal_measured_speed", {})), *w.get("equal_measured_speed_other", {}).items()]:
        for sp, e in eq.items():
            ppls = ", ".join(f"{k} {x:.1f}" for k, x in sorted(e["ppl"].items(), key=lambda kv: kv[1]))
            lines.append(f"- At a measured {sp}x ({wl} workload tokens/s, interpolated): lowest eval PPL "
                         f"**{e['winner']}** ({ppls}).")
    if w.get("measured_pareto"):
        lines.append(f"- Not dominated on (eval PPL, measured speedup): {', '.join(w['measured_pareto'])}.")
    lines.append(f"- Not dominated on (eval PPL, ideal decode speedup): {', '.join(w['pareto'])}.")
    return lines


def _variant_lines(res: dict, w: dict, healed: bool) -> list[str]:
    """What each variant removed, how each was made, and the plots."""
    lines = ["", "## What each variant removed", "",
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
    if w.get("measured_pareto"):
        lines += ["![measured speedup vs PPL](measured_speedup_vs_ppl.png)", ""]
    if healed:
        lines += ["![PPL before and after healing](ppl_after_healing.png)", ""]
    return lines


def healed_zero_shot_best(res: dict) -> dict[str, str]:
    """Per target (str): the variant whose healed model has the highest measured zero-shot average."""
    out = {}
    for t in res["targets"]:
        zs = [r for r in res["rows"] if r["target"] == t and math.isfinite(zero_shot_avg(r.get("healed")))]
        if zs:
            out[str(t)] = max(zs, key=lambda r: zero_shot_avg(r["healed"]))["variant"]
    return out


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long lists (1: same order, -1: reversed); NaN below 2 items."""
    n = len(a)
    if n < 2:
        return math.nan
    s = sum((1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0)
            for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def heal_ranking(res: dict) -> dict:
    """Per target: the variants ranked by eval PPL before and after healing, and Kendall's tau between them."""
    out = {}
    for t in res["targets"]:
        rows = [r for r in res["rows"] if r["target"] == t and r.get("healed")]
        if len(rows) < 2:
            continue
        before = [r["variant"] for r in sorted(rows, key=lambda r: r["eval_ppl"])]
        after = [r["variant"] for r in sorted(rows, key=lambda r: r["healed"]["eval_ppl"])]
        out[str(t)] = {"before": before, "after": after,
                       "kendall_tau": kendall_tau([r["eval_ppl"] for r in rows],
                                                  [r["healed"]["eval_ppl"] for r in rows])}
    return out


def healed_section(res: dict) -> list[str]:
    """`rtk ablate --heal`: PPL before and after the same healing, and whether the ranking survives it."""
    rows = [r for r in res["rows"] if r.get("healed")]
    conf = res.get("heal_config")
    if not rows or not conf:
        return []
    d = res["dense"]["eval_ppl"]
    h0 = rows[0]["healed"]
    zs = any(math.isfinite(zero_shot_avg(r["healed"])) for r in rows)
    steps = h0["tokens"] // (conf["micro_batch"] * conf["grad_accum"] * conf["data"]["seq_len"])
    lines = ["", "## After healing (rtk ablate --heal)", "",
             f"- Every model distilled from the dense one with the same settings: {h0['tokens']:,} tokens of "
             f"{conf['data']['source']}" + (f" [{conf['data']['split']}]" if conf['data'].get('split') else "")
             + f" in blocks of {conf['data']['seq_len']}; {settings_line(conf, steps)}; eval PPL as above.", "",
             "| variant | target | eval PPL pruned | PPL after healing | x dense before | x dense after | "
             "rank before | rank after | healing s |" + (" zero-shot avg pruned | after healing |" if zs else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if zs else "")]
    ranks = heal_ranking(res)
    for r in rows:
        rk = ranks.get(str(r["target"]), {})
        rb = rk["before"].index(r["variant"]) + 1 if rk else "-"
        ra = rk["after"].index(r["variant"]) + 1 if rk else "-"
        lines.append(f"| {r['variant']} | {r['target']:.0%} | {r['eval_ppl']:.3f} | {r['healed']['eval_ppl']:.3f} | "
                     f"{r['eval_ppl'] / d:.2f} | {r['healed']['eval_ppl'] / d:.2f} | {rb} | {ra} | "
                     f"{r['healed']['wall_seconds']:.0f} |"
                     + (f" {_acc(zero_shot_avg(r))} | {_acc(zero_shot_avg(r['healed']))} |" if zs else ""))
    if zs:
        dz = res["dense"].get("bench", {}).get("zero_shot", {})
        lines += ["", "Zero-shot as in \"Measured\" below" + (f" (dense {dz['avg_acc']:.3f} ± "
                  f"{dz['avg_acc_stderr']:.3f})" if dz.get("docs") else "") + "; a healed model serves at its "
                  "pruned model's speed (same shapes)."]
    lines.append("")
    best_zs = healed_zero_shot_best(res)
    for t, rk in ranks.items():
        same = "the same order" if rk["before"] == rk["after"] else "a different order"
        zw = best_zs.get(t)
        lines.append(f"- {float(t):.0%} removed: after healing {same}; best before **{rk['before'][0]}**"
                     f"{lead_text(res, 'ppl', t, rk['before'][0])}, after **{rk['after'][0]}**"
                     f"{lead_text(res, 'healed_ppl', t, rk['after'][0])}; Kendall's tau between the two rankings {rk['kendall_tau']:+.2f}"
                     + (f"; best zero-shot after healing **{zw}**{lead_text(res, 'healed_zero_shot', t, zw)}."
                        if zw else "."))
    return lines


def _ratio(st: dict) -> str:
    if not st or not math.isfinite(st.get("median", math.nan)):
        return "-"
    if len(st["rounds"]) > 1:
        return f"{st['median']:.3f} [{st['min']:.3f}, {st['max']:.3f}]"
    return f"{st['median']:.3f}"


def measured_section(res: dict, w: dict) -> list[str]:
    """The table of `rtk ablate --bench` measurements, with how they were made."""
    conf = res.get("bench_config")
    rows = [r for r in res["rows"] if r.get("bench")]
    if not conf or not rows:
        return []
    wls = conf["workloads"]
    d = res["dense"].get("bench", {}).get("zero_shot", {})
    ws = "; ".join(f"**{x['name']}** = {x['num_prompts']} random-token prompts of {x['input_len']} tokens, "
                   f"{x['output_len']} generated, {x['concurrency']} in flight" for x in wls)
    lines = ["", "## Measured (rtk ablate --bench)", "",
             f"- Speed: each model served by vLLM (OpenAI /v1/completions, streamed, {conf['dtype']}) and loaded "
             f"with {ws}; the dense model's server stays up and each round runs dense then candidate with the "
             f"same prompts ({conf['rounds']} rounds per model; speedup = median of per-round ratios "
             "[min, max]). tokens/s x = output tokens/s ratio; TPOT x and TTFT x = dense / candidate latency.",
             f"- Zero-shot: {', '.join(conf['tasks']) or 'none'}, first {conf['limit']} documents each "
             f"(lm-eval style acc), {conf['quality_backend']}, {conf['dtype']}; average of task accuracies"
             + (f"; dense {d['avg_acc']:.3f} ± {d['avg_acc_stderr']:.3f}." if d and d.get("docs") else "."),
             "- Eval PPL as above (torch, in process).", ""]
    head = "| variant | target | params removed | eval PPL | zero-shot avg |"
    sep = "|---|---:|---:|---:|---:|"
    for x in wls:
        head += f" {x['name']} tok/s x | {x['name']} TPOT x | {x['name']} TTFT x |"
        sep += "---:|---:|---:|"
    lines += [head + " ideal decode x (B=1) |", sep + "---:|"]
    if d:
        lines.append(f"| dense | 0% | 0.0% | {res['dense']['eval_ppl']:.3f} | {_acc(d['avg_acc'])} |"
                     + " 1 | 1 | 1 |" * len(wls) + " 1 |")
    for r in rows:
        b = r["bench"]
        sp = b.get("served", {}).get("speedup", {})
        cells = "".join(f" {_ratio(sp.get(x['name'], {}).get('throughput'))} | "
                        f"{_ratio(sp.get(x['name'], {}).get('tpot'))} | {_ratio(sp.get(x['name'], {}).get('ttft'))} |"
                        for x in wls)
        lines.append(f"| {r['variant']} | {r['target']:.0%} | {r['params_removed_fraction']:.1%} | {r['eval_ppl']:.3f} | "
                     f"{_acc(zero_shot_avg(r))} |{cells} {r['decode_speedup_ideal_b1']:.3f} |")
    return lines


def _interval(p: dict | None) -> str:
    """A paired difference (rtk.paired) as '+d [low, high] verdict', '-' where none was computed."""
    if not p:
        return "- | -"
    return f"{p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] | {p['verdict']}"


def paired_section(res: dict) -> list[str]:
    """Every variant against the dense model on the same blocks and documents: eval PPL and zero-shot average
    (and, after --heal, the healed model's zero-shot), each difference with its paired 95% interval and the
    verdict read from it."""
    rows = [r for r in res["rows"] if r.get("eval_vs_dense") or r.get("bench", {}).get("zero_shot_vs_dense")]
    if not rows:
        return []
    healed = any((r.get("healed") or {}).get("bench", {}).get("zero_shot_vs_dense") for r in rows)
    lines = ["", "## Against the dense model (paired)", "",
             f"Differences variant - dense on the same eval blocks and the same documents; {res.get('paired_rule') or 'paired bootstrap 95% interval'}. "
             "Lower PPL is better, higher accuracy is better.", "",
             "| variant | target | eval PPL diff [95%] | verdict | zero-shot avg diff [95%] | verdict |"
             + (" healed zero-shot diff [95%] | verdict |" if healed else ""),
             "|---|---:|---|---|---|---|" + ("---|---|" if healed else "")]
    for r in rows:
        h = (r.get("healed") or {}).get("bench", {}).get("zero_shot_vs_dense")
        lines.append(f"| {r['variant']} | {r['target']:.0%} | {_interval(r.get('eval_vs_dense'))} | "
                     f"{_interval(r.get('bench', {}).get('zero_shot_vs_dense'))} |"
                     + (f" {_interval(h)} |" if healed else ""))
    return lines


def _acc(x: float) -> str:
    """A zero-shot average, or '-' where none was measured (--bench-tasks none)."""
    return f"{x:.3f}" if math.isfinite(x) else "-"


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
    replace_atomic(out / "ppl_vs_params.png", lambda p: fig.savefig(p, dpi=110, format="png"))
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
    replace_atomic(out / "speedup_vs_ppl.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def measured_plot(res: dict, out: Path) -> bool:
    by_var: dict[str, list] = {}
    for r in res["rows"]:
        if math.isfinite(measured(r)):
            by_var.setdefault(r["variant"], []).append(r)
    if not by_var:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = res["dense"]["eval_ppl"]
    for name, rows in by_var.items():
        pts = sorted([(1.0, d)] + [(measured(r), r["eval_ppl"]) for r in rows])
        ax.plot([p for _, p in pts], [s for s, _ in pts], marker="o", ms=4, label=name,
                ls="-" if "progressive" in name or name == "blocks-ppl" else "--")
        for r in rows:
            ax.annotate(f"{r['target']:.0%}", (r["eval_ppl"], measured(r)), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("eval PPL (log scale)")
    conf = res.get("bench_config", {})
    wl = next((x for x in conf.get("workloads", []) if x["name"] == MEASURED), None)
    desc = (f"{wl['num_prompts']}x{wl['input_len']} in/{wl['output_len']} out, c={wl['concurrency']}" if wl else "")
    ax.set_ylabel(f"measured speedup (vLLM output tok/s, {MEASURED})")
    ax.set_title(f"speed vs quality, measured: {res['model']} served by vLLM ({desc})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return True


def healed_plot(res: dict, out: Path) -> None:
    """Eval PPL of each variant pruned and after the same healing, one panel per target (lines cross where
    the ranking changes)."""
    targets = [t for t in res["targets"] if any(r.get("healed") and r["target"] == t for r in res["rows"])]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4.5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for k, r in enumerate(r for r in res["rows"] if r["target"] == t and r.get("healed")):
            ax.plot([0, 1], [r["eval_ppl"], r["healed"]["eval_ppl"]], marker="o", ms=4, color=f"C{k % 10}",
                    ls="-" if "progressive" in r["variant"] or r["variant"] == "blocks-ppl" else "--",
                    label=r["variant"])
        ax.axhline(res["dense"]["eval_ppl"], color="k", lw=0.8, ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xticks([0, 1], ["pruned", "healed"])
        ax.set_ylabel("eval PPL (log scale)")
        ax.set_title(f"{t:.0%} removed", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(f"{res['model']}: PPL before and after the same healing", fontsize=9)
    fig.tight_layout()
    replace_atomic(out / "ppl_after_healing.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> None:
    out = Path(out)
    res = {**res, "winners": winners(res)}
    replace_atomic(out / "ablation.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    replace_atomic(out / "ablation.md", lambda p: p.write_text(markdown(res)))
    plots(res, out)
    if any(r.get("bench") for r in res["rows"]):
        replace_atomic(out / "measured_speedup_vs_ppl.png", lambda p: measured_plot(res, p))
    if any(r.get("healed") for r in res["rows"]):
        healed_plot(res, out)
