"""bench.json, bench.md and plots (speedup vs PPL; latency / speed distributions; the sweep)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


TITLES = {"piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "boolq": "BoolQ",
          "hellaswag": "HellaSwag", "winogrande": "WinoGrande"}
# served metrics shown as speedups in the card and summary: (key, name, higher is better)
SERVED_MAIN = (("median_tpot_ms", "TPOT (median)", False), ("median_ttft_ms", "TTFT (median)", False),
               ("median_itl_ms", "ITL (median)", False), ("median_e2el_ms", "E2E latency (median)", False),
               ("output_throughput", "output tokens/s", True))


def speed_keys(concurrency, batch_sizes, serving: bool) -> list[tuple[str, bool]]:
    """(path in a speed record, higher is better) for every speed figure a bench run records."""
    if serving:
        keys = []
        for c in concurrency:
            for name, hib in (("median_ttft_ms", False), ("median_tpot_ms", False), ("median_itl_ms", False),
                              ("median_e2el_ms", False), ("p99_tpot_ms", False), ("output_throughput", True),
                              ("request_throughput", True)):
                keys.append((f"c{c}.{name}", hib))
        return keys
    return [(f"b{n}.{p}.tokens_per_s", True) for n in batch_sizes for p in ("prefill", "decode")]


def at_path(rec: dict, path: str):
    """rec["a"]["b"] for path "a.b"."""
    for k in path.split("."):
        rec = rec[k]
    return rec


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def _how(res: dict) -> str:
    c = res["config"]
    if res["serving"]:
        return how_served(res)
    return (f"{c['backend']} backend in process, random prompts of {c['prompt_len']} tokens then {c['gen_len']} "
            f"greedy decode steps with KV cache, batch {', '.join(map(str, c['batch_sizes']))}; median of "
            f"{c['repeats']} repeats after a warm-up, {c['rounds']} interleaved rounds, {c['dtype']}")


def how_served(res: dict) -> str:
    c = res["config"]
    return (f"vLLM's benchmark (`vllm bench serve`), random dataset: {c['num_prompts']} prompts of {c['input_len']} "
            f"tokens, {c['output_len']} output tokens (ignore_eos), max concurrency "
            f"{', '.join(map(str, c['concurrency']))}; {c['rounds']} rounds, baseline and candidates interleaved; "
            f"{c['dtype']}, {res.get('machine', '')}")


def main_speed_key(res: dict) -> tuple[str, str]:
    c = res["config"]
    if res["serving"]:
        return f"c{c['concurrency'][0]}.median_tpot_ms", f"TPOT speedup (median, concurrency {c['concurrency'][0]})"
    return f"b{c['batch_sizes'][0]}.decode.tokens_per_s", f"decode speedup (batch {c['batch_sizes'][0]})"


def _pm(rec: dict, k: str) -> str:
    return f"{rec[k]:.3f} ± {rec[k + '_stderr']:.3f}" if k in rec else "n/a"


ACCURACY_HEAD = ["| task | metric | base | {name} | recovery | difference [95% interval] | verdict |",
                 "|---|---|---:|---:|---:|---|---|"]


def interval_text(p: dict | None, nd: int = 3) -> tuple[str, str]:
    """(difference [low, high], verdict) of a paired record (rtk.paired), or n/a where none was computed."""
    if not p:
        return "n/a", "not computed"
    return f"{p['diff']:+.{nd}f} [{p['low']:+.{nd}f}, {p['high']:+.{nd}f}]", p["verdict"]


def accuracy_rows(q0: dict, q1: dict, paired: dict | None = None) -> list[str]:
    """Rows under ACCURACY_HEAD (recovery = candidate / base, in %; the difference candidate - base with its
    paired 95% interval over the same documents and the verdict read from it), then the mean over tasks."""
    rows, paired = [], paired or {}
    for t, s0 in q0.get("tasks", {}).items():
        s1 = q1["tasks"][t]
        for k in ("acc", "acc_norm"):
            if k in s0 and k in s1:
                rec = f"{100 * s1[k] / s0[k]:.1f}%" if s0[k] else "n/a"
                diff, word = interval_text(paired.get(f"{t}.{k}"))
                rows.append(f"| {TITLES.get(t, t)} (n={s0['n']}) | {k} | {_pm(s0, k)} | {_pm(s1, k)} | {rec} | "
                            f"{diff} | {word} |")
    for k in ("acc", "acc_norm"):
        p = paired.get(f"mean.{k}")
        if p:
            diff, word = interval_text(p)
            rows.append(f"| mean of {len(p['tasks'])} tasks | {k} | | | | {diff} | **{word}** |")
    return rows


def speed_rows(res: dict, label: str) -> list[str]:
    """| metric | base | candidate | speedup [min, max] | rows of the served metrics (speedup > 1 = faster)."""
    base = res["models"][0]
    cand = next(m for m in res["models"] if m["label"] == label)
    rows = []
    for c in res["config"]["concurrency"]:
        for key, name, hib in SERVED_MAIN:
            path = f"c{c}.{key}"
            r = res["ratios"][label].get(path)
            if not r or not r["rounds"]:
                continue
            b = _median([at_path(s, path) for s in base["speed"]])
            x = _median([at_path(s, path) for s in cand["speed"]])
            sp, lo, hi = (r["median"], r["min"], r["max"]) if hib else (1 / r["median"], 1 / r["max"], 1 / r["min"])
            unit = "" if hib else " ms"
            rows.append(f"| {name}, concurrency {c} | {_f(b, 1)}{unit} | {_f(x, 1)}{unit} | **{sp:.2f}x** "
                        f"[{lo:.2f}, {hi:.2f}] |")
    return rows


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def markdown(res: dict) -> str:
    """bench.md: the models, quality, speed, the sweep, the ratios per candidate and how it was measured."""
    c, models = res["config"], res["models"]
    lines = [f"# rtk bench: {c['backend']} backend", "",
             f"Run {res['started']} .. {res['finished']}. Ratios are candidate / baseline, computed round by round "
             "(baseline and candidates interleaved); the spread is [min, max] over rounds.", "",
             "| model | path | params |", "| --- | --- | ---: |"]
    lines += [f"| {m['label']} | `{m['path']}` | {m['params']:,} |" if m["params"] else
              f"| {m['label']} | `{m['path']}` | n/a |" for m in models]
    if models[0].get("quality"):
        lines += _quality_lines(res)
    if models[0]["speed"]:
        lines += _speed_lines(res)
    if res.get("sweep"):
        lines += _sweep_lines(res["sweep"])
    lines += ["", "## Ratios (candidate / baseline)", ""]
    for label, r in res["ratios"].items():
        lines += _ratio_lines(res, label, r)
    lines += ["## How the numbers were measured", "", *[f"- {x}" for x in res.get("how", [])], "",
              "Plots: " + ", ".join(res.get("plots", [])), ""]
    return "\n".join(lines)


def _quality_lines(res: dict) -> list[str]:
    """## Quality: every model's WikiText-2 PPL, and lm-eval's accuracy with recovery and commands."""
    c, models = res["config"], res["models"]
    q0 = models[0]["quality"]
    w = q0["wikitext2"]
    lines = ["", "## Quality", "",
             f"PPL: {w.get('text', 'WikiText-2 raw')}, {w['samples']} blocks x {w['seq_len']} tokens "
             f"({w['predicted_tokens']:,} predicted tokens), computed by the {c['backend']} backend.", "",
             "| model | WikiText-2 PPL | difference to baseline [95% interval] | verdict |",
             "| --- | ---: | --- | --- |"]
    paired = res.get("paired", {})
    for m in models:
        diff, word = interval_text(paired.get(m["label"], {}).get("wikitext2.ppl")) if m is not models[0] else ("", "")
        lines.append(f"| {m['label']} | {m['quality']['wikitext2']['ppl']:.3f} | {diff} | {word} |")
    if res.get("paired_rule"):
        lines += ["", f"Verdicts: {res['paired_rule']} (PPL: blocks resampled; lower is better). Per-block NLLs are "
                  "in bench.json (`quality.wikitext2.block_nll`)."]
    if not q0.get("lm_eval"):
        return lines
    lines += ["", "### Accuracy (lm-evaluation-harness)", "",
              f"lm-eval {q0['lm_eval'].get('lm_eval_version', '')}, zero-shot, "
              f"{'first ' + str(c['limit']) + ' documents' if c['limit'] else 'all documents'} per task; "
              "± is lm-eval's standard error; recovery = candidate / baseline; the difference is candidate - "
              "baseline on the same documents, and its verdict is read from the paired interval, not from the "
              "recovery. Per-document scores: `quality.per_doc` in bench.json, and lm-eval's own `samples_*.jsonl` "
              "beside each results file.", ""]
    for m in models[1:]:
        lines += [ACCURACY_HEAD[0].format(name=m["label"]), ACCURACY_HEAD[1],
                  *accuracy_rows(q0, m["quality"], paired.get(m["label"])), ""]
    lines += ["Each model's numbers as lm-eval printed them, and the command that reproduces them "
              "(`--output_path` and `--log_samples`, which write the files, left out):", ""]
    for m in models:
        le = m["quality"]["lm_eval"]
        lines += [f"**{m['label']}** ({le['seconds']} s; raw results `{le['results_file']}`):", "", "```bash",
                  le["command"], "```", "", *le["table"], ""]
    return lines


def _speed_lines(res: dict) -> list[str]:
    """## Speed: every speed figure's median over rounds per model (served: the first round's commands)."""
    c, models = res["config"], res["models"]
    keys = speed_keys(c["concurrency"], c["batch_sizes"], res["serving"])
    lines = ["", "## Speed", "", _how(res) + ". Values: median over rounds.", "",
             "| metric | " + " | ".join(m["label"] for m in models) + " |",
             "| --- | " + " | ".join("---:" for _ in models) + " |"]
    for key, _ in keys:
        vals = [sorted(at_path(s, key) for s in m["speed"]) for m in models]
        lines.append(f"| {key} | " + " | ".join(_f(v[len(v) // 2], 2) for v in vals) + " |")
    if res["serving"]:
        lines += ["", "vLLM's JSON result of every run is in `vllm_bench/`; e.g. the first round of each model:",
                  "", "```bash"]
        lines += [m["speed"][0][f"c{cc}"]["command"] for m in models for cc in c["concurrency"][:1]]
        lines += ["```"]
    return lines


def _sweep_lines(sw: dict) -> list[str]:
    """## Throughput vs latency: every sweep point per model, and the commands."""
    lines = ["", f"## Throughput vs latency ({sw['tool']})", "", sw["how"], "", f"![sweep]({sw['plot']})", "",
             "| model | point | requests done / failed / unfinished | requests/s | output tokens/s | "
             "median TTFT ms | median ITL ms |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for label, pts in sw["points"].items():
        for p in pts:
            lines.append(f"| {label} | {p['name']} | {p['completed']} / {p['failed']} / {p['incomplete']} | "
                         f"{_f(p['request_rate'], 2)} | {_f(p['output_throughput'], 1)} "
                         f"| {_f(p['median_ttft_ms'], 1)} | {_f(p['median_itl_ms'], 1)} |")
    return lines + ["", "Reproduce (GuideLLM's scenario and report per model are in `sweep/`):", "", "```bash",
                    *sw["commands"].values(), "```"]


def _ratio_lines(res: dict, label: str, r: dict) -> list[str]:
    """### label: the served speedups, the ideal speedups, and every ratio with its spread."""
    lines = [f"### {label}", ""]
    if res["serving"] and res["models"][0]["speed"]:
        lines += ["| served metric | baseline | candidate | speedup [min, max] |", "|---|---:|---:|---|",
                  *speed_rows(res, label), ""]
    for b, d in res["ideal"].get(label, {}).items():
        lines.append(f"- ideal at {b} (prompt {d['workload']['prompt_len']}, output {d['workload']['output_len']}): "
                     f"parameter ratio {d['param_ratio']:.3f}; prefill speedup from FLOPs "
                     f"{d['ideal_prefill_speedup']:.3f}x; decode speedup from bytes read (weights + KV cache) "
                     f"{d['ideal_decode_speedup']:.3f}x (from FLOPs {d['ideal_decode_flops_speedup']:.3f}x); "
                     f"KV cache per token {d['kv_bytes_ratio']:.3f}")
    if r:
        lines += ["", "| metric | ratio | spread | note |", "| --- | ---: | --- | --- |"]
    for key, v in r.items():
        better = "higher is better" if v["higher_is_better"] else "lower is better"
        if "rounds" in v:
            note = better + ("; **spread includes 1** (no clear change)" if v["spread_includes_1"] else "")
            lines.append(f"| {key} | {_f(v['median'])} | [{_f(v['min'])}, {_f(v['max'])}] over "
                         f"{len(v['rounds'])} rounds | {note} |")
        elif "diff" in v:
            lines.append(f"| {key} | {_f(v['ratio'])} | diff {v['diff']:+.3f} ± {v['diff_stderr']:.3f} | "
                         f"{better} |")
        else:
            lines.append(f"| {key} | {_f(v['ratio'])} | deterministic | {better} |")
    return lines + [""]


def plots(res: dict, out: Path) -> list[str]:
    written = []
    models = res["models"]
    key, title = main_speed_key(res)
    if models[0].get("quality") and models[0]["speed"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in models:
            r = res["ratios"].get(m["label"], {}).get(key)
            if m["label"] == "baseline":
                y, lo, hi = 1.0, 0.0, 0.0
            elif r and r["rounds"]:
                inv = not r["higher_is_better"]
                y = 1 / r["median"] if inv else r["median"]
                lo = y - (1 / r["max"] if inv else r["min"])
                hi = (1 / r["min"] if inv else r["max"]) - y
            else:
                continue
            ax.errorbar([m["quality"]["wikitext2"]["ppl"]], [y], yerr=[[lo], [hi]], fmt="o", capsize=4,
                        label=m["label"])
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("WikiText-2 test PPL")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "speedup_vs_ppl.png", dpi=110)
        plt.close(fig)
        written.append("speedup_vs_ppl.png")
    if models[0]["speed"]:
        c = res["config"]
        if res["serving"]:
            conc = f"c{c['concurrency'][-1]}"
            panels = [(n, [[x for s in m["speed"] for x in s[conc]["samples_ms"][n]] for m in models])
                      for n in ("ttft", "tpot", "itl")]
            unit = f"ms, concurrency {c['concurrency'][-1]}, all rounds"
        else:
            b = f"b{c['batch_sizes'][-1]}"
            panels = [(p, [[s[b][p]["tokens_per_s"] for s in m["speed"]] for m in models])
                      for p in ("prefill", "decode")]
            unit = f"tokens/s, batch {c['batch_sizes'][-1]}, per round"
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
        for ax, (name, data) in zip(axes, panels):
            ax.boxplot([d if d else [math.nan] for d in data])
            ax.set_xticks(range(1, len(models) + 1), [m["label"] for m in models], fontsize=7)
            ax.set_title(f"{name} ({unit})", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")
    if res.get("sweep"):
        written.append(res["sweep"]["plot"])
    return written


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, out)
    (out / "bench.md").write_text(markdown(res))
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=float))  # last: its presence = complete
