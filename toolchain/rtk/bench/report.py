"""bench.json, bench.md and plots (speedup vs PPL; latency / speed distributions)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runner import _get, speed_keys  # noqa: E402


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def _how(res: dict) -> str:
    c = res["config"]
    if res["serving"]:
        return (f"{c['backend']} backend, /v1/completions streaming, {c['num_prompts']} random token-id prompts of "
                f"{c['input_len']} tokens, {c['output_len']} output tokens with ignore_eos, concurrency "
                f"{', '.join(map(str, c['concurrency']))}; {c['rounds']} interleaved rounds, {c['dtype']}")
    return (f"{c['backend']} backend in process, random prompts of {c['prompt_len']} tokens then {c['gen_len']} "
            f"greedy decode steps with KV cache, batch {', '.join(map(str, c['batch_sizes']))}; median of "
            f"{c['repeats']} repeats after a warm-up, {c['rounds']} interleaved rounds, {c['dtype']}")


def main_speed_key(res: dict) -> tuple[str, str]:
    c = res["config"]
    if res["serving"]:
        return f"c{c['concurrency'][0]}.median_tpot_ms", f"TPOT speedup (median, concurrency {c['concurrency'][0]})"
    return f"b{c['batch_sizes'][0]}.decode.tokens_per_s", f"decode speedup (batch {c['batch_sizes'][0]})"


def markdown(res: dict) -> str:
    c, models = res["config"], res["models"]
    lines = [f"# rtk bench: {c['backend']} backend", "",
             f"Run {res['started']} .. {res['finished']}. Ratios are candidate / baseline, computed round by round "
             "(baseline and candidates interleaved); the spread is [min, max] over rounds.", "",
             "| model | path | params |", "| --- | --- | ---: |"]
    lines += [f"| {m['label']} | `{m['path']}` | {m['params']:,} |" if m["params"] else
              f"| {m['label']} | `{m['path']}` | n/a |" for m in models]
    if models[0].get("quality"):
        q0 = models[0]["quality"]
        w = q0["wikitext2"]
        tasks = list(q0["tasks"])
        lines += ["", "## Quality", "",
                  f"PPL: WikiText-2 raw [test], {w['samples']} blocks x {w['seq_len']} tokens "
                  f"({w['predicted_tokens']:,} predicted tokens), computed by the {c['backend']} backend. "
                  f"Zero-shot: lm-eval-harness prompts, log-likelihood of each choice's continuation; "
                  f"acc_norm divides by the continuation's characters; "
                  f"{'first ' + str(c['limit']) + ' records' if c['limit'] else 'all records'} per task "
                  "(± is the standard error).", "",
                  "| model | PPL | " + " | ".join(f"{t} acc / acc_norm" for t in tasks) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
        for m in models:
            q = m["quality"]
            cells = [f"{q['tasks'][t]['acc']:.3f}±{q['tasks'][t]['acc_stderr']:.3f} / "
                     f"{q['tasks'][t]['acc_norm']:.3f}" for t in tasks]
            lines.append(f"| {m['label']} | {q['wikitext2']['ppl']:.3f} | " + " | ".join(cells) + " |")
    if models[0]["speed"]:
        keys = speed_keys(_cfg(c), res["serving"])
        lines += ["", "## Speed", "", _how(res) + ". Values: median over rounds.", "",
                  "| metric | " + " | ".join(m["label"] for m in models) + " |",
                  "| --- | " + " | ".join("---:" for _ in models) + " |"]
        for key, _ in keys:
            vals = [sorted(_get(s, key) for s in m["speed"]) for m in models]
            lines.append(f"| {key} | " + " | ".join(_f(v[len(v) // 2], 2) for v in vals) + " |")
    lines += ["", "## Ratios (candidate / baseline)", ""]
    for label, r in res["ratios"].items():
        ideal = res["ideal"].get(label, {})
        lines += [f"### {label}", ""]
        for b, d in ideal.items():
            lines.append(f"- ideal at {b} (prompt {d['workload']['prompt_len']}, output {d['workload']['output_len']}): "
                         f"parameter ratio {d['param_ratio']:.3f}; prefill speedup from FLOPs "
                         f"{d['ideal_prefill_speedup']:.3f}x; decode speedup from bytes read (weights + KV cache) "
                         f"{d['ideal_decode_speedup']:.3f}x (from FLOPs {d['ideal_decode_flops_speedup']:.3f}x); "
                         f"KV cache per token {d['kv_bytes_ratio']:.3f}")
        lines += ["", "| metric | ratio | spread | note |", "| --- | ---: | --- | --- |"]
        for key, v in r.items():
            better = "higher is better" if v["higher_is_better"] else "lower is better"
            if "rounds" in v:
                inc = v["spread_includes_1"]
                note = better + ("; **spread includes 1** (no clear change)" if inc else "")
                lines.append(f"| {key} | {_f(v['median'])} | [{_f(v['min'])}, {_f(v['max'])}] over "
                             f"{len(v['rounds'])} rounds | {note} |")
            elif "diff" in v:
                lines.append(f"| {key} | {_f(v['ratio'])} | diff {v['diff']:+.3f} ± {v['diff_stderr']:.3f} | "
                             f"{better} |")
            else:
                lines.append(f"| {key} | {_f(v['ratio'])} | deterministic | {better} |")
        lines.append("")
    lines += ["Plots: speedup_vs_ppl.png, latency.png", ""]
    return "\n".join(lines)


class _cfg:  # attribute view of the saved config for speed_keys
    def __init__(self, c):
        self.__dict__.update(c)


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
    return written


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, out)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "bench.md").write_text(markdown(res))
