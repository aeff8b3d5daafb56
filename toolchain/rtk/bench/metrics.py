"""Arithmetic rtk keeps for itself: in-process speed summaries, candidate/baseline ratios computed round by
round (served latencies are vLLM's benchmark's own numbers), and the paired differences of quality on the same
blocks and documents (rtk.paired)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from rtk import paired
from rtk.errors import RtkError
from rtk.records.bench import at_path, speed_keys


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


def ratios(result: dict, cfg) -> dict:
    """Every candidate against the baseline: quality ratios and differences, speed ratios per round."""
    base = result["models"][0]
    serving = result["serving"]
    out = {}
    for j, cand in enumerate(result["models"][1:], start=1):
        r = {}
        if cand.get("quality") and base.get("quality"):
            q, qb = cand["quality"], base["quality"]
            r["wikitext2.ppl"] = {"ratio": q["wikitext2"]["ppl"] / qb["wikitext2"]["ppl"], "higher_is_better": False}
            for t, s in q["tasks"].items():
                sb = qb["tasks"][t]
                for k in ("acc", "acc_norm"):
                    if k not in s or k not in sb:
                        continue  # lm-eval reports acc only for boolq and winogrande
                    se = math.hypot(s[f"{k}_stderr"], sb[f"{k}_stderr"])
                    r[f"{t}.{k}"] = {"ratio": s[k] / sb[k] if sb[k] else math.nan, "diff": s[k] - sb[k],
                                     "diff_stderr": se, "higher_is_better": True}
        if cand.get("speed"):
            for key, hib in speed_keys(cfg.concurrency, cfg.batch_sizes, serving):
                st = ratio_stats([at_path(x, key) for x in base["speed"]], [at_path(x, key) for x in cand["speed"]])
                r[key] = {**st, "higher_is_better": hib}
        out[cand["label"]] = r
    return out


def paired_quality(q: dict, qb: dict) -> dict:
    """A model against the baseline on the same blocks and documents (rtk.paired), each with its 95% interval and
    verdict: WikiText-2 PPL over the blocks, each task's acc / acc_norm, and their mean over the tasks."""
    out = {}
    w, wb = q.get("wikitext2") or {}, qb.get("wikitext2") or {}
    if "block_nll" in w and "block_nll" in wb and w["block_tokens"] == wb["block_tokens"]:
        out["wikitext2.ppl"] = paired.ppl_diff(w["block_nll"], wb["block_nll"], w["block_tokens"])
    pd, pb = q.get("per_doc") or {}, qb.get("per_doc") or {}
    try:
        for k in ("acc", "acc_norm"):
            names = [t for t in pd if k in pd[t] and k in pb.get(t, {})]
            for t in names:
                out[f"{t}.{k}"] = paired.doc_diff(pd, pb, k, [t])
            if len(names) > 1:
                out[f"mean.{k}"] = {**paired.doc_diff(pd, pb, k, names), "tasks": names}
    except ValueError as exc:
        raise RtkError(f"paired comparison: {exc}") from None
    return out
