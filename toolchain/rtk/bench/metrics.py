"""Arithmetic rtk keeps for itself: in-process speed summaries and candidate/baseline ratios computed
round by round (served latencies are vLLM's benchmark's own numbers)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence


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
