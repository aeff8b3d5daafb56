"""Throughput against latency for the baseline and every candidate, on one plot: the picture model cards show.

- `guidellm`: GuideLLM's `--profile sweep` (synchronous, throughput, then constant rates in between), run as
  `guidellm run --scenario FILE` with a scenario rtk writes (synthetic prompts of `input_len` tokens,
  `output_len` output tokens, /v1/completions, each point `sweep_seconds` long); its JSON report is kept.
- `rates`: vLLM's own benchmark at several request rates (a first run at an unbounded rate gives the
  server's maximum, then fractions of it), for installs without GuideLLM.
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rtk.errors import RtkError

RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def guidellm_scenario(url: str, model: str, tokenizer: str, input_len: int, output_len: int, seconds: int,
                      points: int, report: Path, max_concurrency: int = 512, chat: bool = False) -> dict:
    """GuideLLM's run spec. `max_concurrency` bounds the throughput point (GuideLLM's default, 512 requests at
    once, leaves a slow CPU server no request finished within a point); `chat`: chat requests."""
    return {"spec": {
        "backend": {"kind": "openai_http", "target": url.rstrip("/"), "model": model,
                    "request_format": "/v1/chat/completions" if chat else "/v1/completions"},
        "profile": {"kind": "sweep", "sweep_size": points, "max_concurrency": max_concurrency},
        "data": [{"kind": "synthetic_text", "prompt_tokens": input_len, "output_tokens": output_len}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "constraints": [{"kind": "max_duration", "seconds": seconds}],
        "outputs": [{"kind": "json", "path": str(report)}]}}


def _stat(metrics: dict, name: str, stat: str):
    try:
        v = metrics[name]["successful"][stat]
    except (KeyError, TypeError):
        return None
    return float(v) if v is not None else None


def guidellm_points(report: dict) -> list[dict]:
    """One point per benchmark of a GuideLLM report: strategy, requests/s, output tokens/s, median TTFT/ITL of
    the requests that completed within the point (latencies None where none did)."""
    pts = []
    for b in report.get("benchmarks", []):
        m = b.get("metrics", {})
        strat = (b.get("config") or {}).get("strategy") or {}
        kind = strat.get("type_") or "?"
        rate = strat.get("rate")
        totals = m.get("request_totals") or {}
        done = int(totals.get("successful") or 0)
        lat = (lambda name: _stat(m, name, "median")) if done else (lambda name: None)
        pts.append({"name": f"{kind}" + (f"@{rate:.2f}" if isinstance(rate, (int, float)) else ""),
                    "request_rate": _stat(m, "requests_per_second", "mean"),
                    "output_throughput": _stat(m, "output_tokens_per_second", "mean"),
                    "median_ttft_ms": lat("time_to_first_token_ms"), "median_itl_ms": lat("inter_token_latency_ms"),
                    "completed": done, "failed": int(totals.get("errored") or 0),
                    "incomplete": int(totals.get("incomplete") or 0)})
    return pts


def run_guidellm(b, cfg, label: str, work: Path) -> tuple[list[dict], str]:
    report = work / "sweep" / f"guidellm-{label}.json"
    scen = work / "sweep" / f"guidellm-{label}-scenario.json"
    scen.parent.mkdir(parents=True, exist_ok=True)
    scen.write_text(json.dumps(guidellm_scenario(b.url, b.model_name, b.path, cfg.input_len, cfg.output_len,
                                                 cfg.sweep_seconds, cfg.sweep_points, report,
                                                 sweep_max_concurrency(cfg), cfg.chat), indent=1))
    argv = [sys.executable, "-m", "guidellm", "run", "--scenario", str(scen), "--disable-console-interactive"]
    log = work / "logs" / f"guidellm-{label}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if rc != 0 or not report.is_file():
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        raise RtkError(f"guidellm failed for {label} (exit {rc}): {lines[-1][:200] if lines else 'no output'} "
                       f"(log: {log})")
    pts = guidellm_points(json.loads(report.read_text()))
    if not pts:
        raise RtkError(f"guidellm wrote no benchmarks to {report} (log: {log})")
    return pts, shlex.join(["guidellm", "run", "--scenario", scen.name])


def sweep_max_concurrency(cfg) -> int:
    """The sweep's throughput point: twice the highest --concurrency level of the run."""
    return 2 * max(cfg.concurrency)


def run_rates(b, cfg, label: str, work: Path) -> tuple[list[dict], str]:
    """vllm bench serve at an unbounded rate, then at fractions of the request rate it reached."""
    rates = list(cfg.sweep_rates)
    n = max(cfg.num_prompts, 16)
    pts, cmd = [], ""

    def one(rate, name):
        nonlocal cmd
        f = work / "sweep" / f"rates-{label}-{name}.json"
        r = b.serve_load(n, cfg.input_len, cfg.output_len, None, seed=4242, result_file=f,
                         log=work / "logs" / f"sweep-{label}.log", request_rate=rate, chat=cfg.chat)
        cmd = r["command"]
        pts.append({"name": name, "request_rate": r["request_throughput"], "output_throughput": r["output_throughput"],
                    "median_ttft_ms": r["median_ttft_ms"], "median_itl_ms": r["median_itl_ms"],
                    "completed": r["completed"], "failed": r["failed"], "incomplete": 0})
        return r

    if not rates:
        top = one(math.inf, "max")["request_throughput"]
        rates = [round(top * f, 3) for f in RATE_FRACTIONS]
    for rate in rates:
        one(rate, f"{rate:g}/s")
    pts.sort(key=lambda p: p["request_rate"] or 0)
    return pts, cmd


def plot(points: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in points.items():
        ok = [x for x in pts if x["completed"] and x["median_itl_ms"] is not None]
        p = sorted(ok, key=lambda x: x["output_throughput"])
        axes[0].plot([x["output_throughput"] for x in p], [x["median_itl_ms"] for x in p], "o-", label=label)
        q = sorted(ok, key=lambda x: x["request_rate"])
        axes[1].plot([x["request_rate"] for x in q], [x["median_ttft_ms"] for x in q], "o-", label=label)
    axes[0].set_xlabel("output tokens/s (whole server)")
    axes[0].set_ylabel("median inter-token latency (ms)")
    axes[1].set_xlabel("requests/s")
    axes[1].set_ylabel("median time to first token (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweeps(cfg, openers: list[Callable], labels: list[str], work: Path, echo) -> dict:
    """Sweep every model (its backend from `openers[i]()`); one plot for all."""
    tool = "GuideLLM sweep" if cfg.sweep == "guidellm" else "vllm bench serve at several request rates"
    points, commands = {}, {}
    for i, label in enumerate(labels):
        echo(f"rtk bench: {tool}: {label}")
        t0 = time.perf_counter()
        b = openers[i]()
        pts, cmd = (run_guidellm if cfg.sweep == "guidellm" else run_rates)(b, cfg, label, work)
        points[label], commands[label] = pts, cmd
        echo(f"rtk bench:   {len(pts)} points in {time.perf_counter() - t0:.0f} s")
    plot(points, work / "sweep.png", f"{tool}: {cfg.input_len} prompt / {cfg.output_len} output tokens")
    if cfg.sweep == "guidellm":
        how = (f"Sweep: GuideLLM (`guidellm run`, profile sweep: synchronous, throughput with at most "
               f"{sweep_max_concurrency(cfg)} requests in flight, then {cfg.sweep_points - 2} constant rates in "
               f"between), synthetic prompts of {cfg.input_len} tokens, {cfg.output_len} output tokens, "
               f"/v1/completions, {cfg.sweep_seconds} s per point; one model at a time; points with no request "
               "completed are left out of the plot.")
    else:
        how = (f"Sweep: vLLM's benchmark at an unbounded request rate, then at "
               f"{', '.join(f'{f:.0%}' for f in RATE_FRACTIONS)} of the request rate reached"
               if not cfg.sweep_rates else f"Sweep: vLLM's benchmark at {', '.join(map(str, cfg.sweep_rates))} req/s")
        how += f" (Poisson arrivals), random prompts of {cfg.input_len} tokens, {cfg.output_len} output tokens."
    return {"tool": tool, "points": points, "commands": commands, "plot": "sweep.png", "how": how}
