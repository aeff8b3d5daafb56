"""Arithmetic of the benchmark: serving latencies (vllm bench serve names), speed summaries,
and pruned/original ratios computed round by round."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class RequestRecord:
    """One streamed request: `start` and chunk arrival times in seconds (perf_counter clock)."""

    start: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0  # from the server's usage when it sends one, else chunks with text
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), as vllm bench serve; None for 1-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def summary_ms(values: Sequence[float], prefix: str) -> dict:
    """mean / median / p99 (numpy's linear percentile), in milliseconds."""
    if not values:
        return {f"mean_{prefix}_ms": math.nan, f"median_{prefix}_ms": math.nan, f"p99_{prefix}_ms": math.nan}
    a = np.asarray(values, dtype=float) * 1000.0
    return {f"mean_{prefix}_ms": float(a.mean()), f"median_{prefix}_ms": float(np.median(a)),
            f"p99_{prefix}_ms": float(np.percentile(a, 99))}


def serving_metrics(records: Sequence[RequestRecord], duration: float) -> dict:
    """The numbers `vllm bench serve` prints, from request records and the wall time of the run."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    m = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
         "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration if duration > 0 else math.nan,
         "output_throughput": out_tokens / duration if duration > 0 else math.nan}
    m.update(summary_ms([r.ttft for r in ok], "ttft"))
    m.update(summary_ms([t for r in ok if (t := r.tpot) is not None], "tpot"))
    m.update(summary_ms([x for r in ok for x in r.itls], "itl"))
    m.update(summary_ms([r.e2el for r in ok], "e2el"))
    return m


def median_speed(n_tokens: int, seconds: Sequence[float]) -> dict:
    """Tokens/s from the median of repeated timings."""
    med = statistics.median(seconds)
    return {"tokens_per_s": n_tokens / med if med > 0 else math.nan, "median_s": med,
            "min_s": min(seconds), "max_s": max(seconds), "repeats": len(seconds)}


def ratio_stats(base: Sequence[float], cand: Sequence[float]) -> dict:
    """candidate/baseline per round (paired), summarized by median, min and max.

    `spread_includes_1` says the rounds do not agree on the direction of the change."""
    pairs = [(b, c) for b, c in zip(base, cand)
             if b is not None and c is not None and math.isfinite(b) and math.isfinite(c) and b != 0]
    if not pairs:
        return {"rounds": [], "median": math.nan, "min": math.nan, "max": math.nan, "spread_includes_1": None}
    rs = [c / b for b, c in pairs]
    lo, hi = min(rs), max(rs)
    return {"rounds": rs, "median": statistics.median(rs), "min": lo, "max": hi,
            "spread_includes_1": bool(lo <= 1.0 <= hi) if len(rs) > 1 else None}
