"""Paired statistics: how sure a comparison of two models on the same documents (or token blocks) is.

Wherever rtk compares models on the same items (rtk bench, `rtk ablate --bench`, select's finalists), the
difference A - B gets a paired bootstrap 95% interval (seeded, so a rerun gives the same interval):

- per-document scores (lm-eval's per-sample acc / acc_norm, 0 or 1): documents are resampled with replacement
  within each task, the same documents for both models; over several tasks each resample averages the task means,
  as lm-eval's averages over tasks do;
- perplexity over token blocks: blocks are resampled with replacement, the same blocks for both models, and each
  model's PPL is exp(summed NLL / summed predicted tokens) of the resample.

The interval is the 2.5th and 97.5th percentiles of the resampled differences. The verdict is read from it, never
from the point estimate alone: "better" or "worse" when the interval lies wholly on one side of zero (higher acc
is better, lower PPL is better), else "no difference shown".
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
VERDICTS = ("better", "worse", "no difference shown")
RULE = (f"paired bootstrap {LEVEL:.0%} interval of the difference on the same documents ({RESAMPLES} resamples, "
        f"seed {SEED}): better / worse only when the interval excludes 0")


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """A's standing against B from the interval of A - B: better, worse, or no difference shown."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0.0 <= high:
        return VERDICTS[2]
    above = low > 0.0
    return VERDICTS[0] if above == higher_is_better else VERDICTS[1]


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - LEVEL) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def _record(diff: float, samples: np.ndarray, higher_is_better: bool, n) -> dict:
    lo, hi = _interval(samples)
    return {"diff": diff, "low": lo, "high": hi, "verdict": verdict(lo, hi, higher_is_better),
            "higher_is_better": higher_is_better, "n": n, "resamples": len(samples), "seed": SEED}


def score_diff(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], higher_is_better: bool = True,
               resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Mean of A's per-document scores minus B's, on the same documents (a[task][i] and b[task][i] score one
    document), averaged over tasks, with its paired bootstrap interval and verdict; n: documents per task."""
    if set(a) != set(b) or not a:
        raise ValueError(f"paired scores need the same tasks for both models, got {sorted(a)} and {sorted(b)}")
    rng = np.random.default_rng(seed)
    total, point = np.zeros(resamples), 0.0
    for task in sorted(a):
        d = np.asarray(a[task], dtype=float) - np.asarray(b[task], dtype=float)
        if d.ndim != 1 or len(d) == 0 or len(a[task]) != len(b[task]):
            raise ValueError(f"task {task}: {len(a[task])} and {len(b[task])} documents are not one paired set")
        total += d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
        point += d.mean()
    k = len(a)
    return _record(float(point / k), total / k, higher_is_better, {t: len(a[t]) for t in sorted(a)})


def ppl_diff(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int], resamples: int = RESAMPLES,
             seed: int = SEED) -> dict:
    """PPL of A minus PPL of B over the same token blocks (per-block summed NLL of each, predicted tokens per
    block), with the interval from resampling blocks and the verdict (lower PPL is better); n: blocks."""
    na, nb, t = (np.asarray(x, dtype=float) for x in (nll_a, nll_b, tokens))
    if not (len(na) == len(nb) == len(t)) or len(t) == 0:
        raise ValueError(f"paired PPL needs the same blocks: {len(na)}, {len(nb)} and {len(t)} given")
    idx = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    ppl = lambda nll: np.exp(np.minimum(nll[idx].sum(axis=1) / t[idx].sum(axis=1), 700.0))  # noqa: E731
    point = math.exp(min(na.sum() / t.sum(), 700.0)) - math.exp(min(nb.sum() / t.sum(), 700.0))
    return _record(point, ppl(na) - ppl(nb), False, len(t))


def doc_diff(a: Mapping[str, dict], b: Mapping[str, dict], metric: str, tasks: Sequence[str] | None = None) -> dict:
    """score_diff of two models' per-document records ({task: {doc_id: [...], <metric>: [...]}}, as
    rtk.bench.accuracy.harness.per_document reads them), documents matched by doc_id; `tasks`: those to average
    (default: every task whose records have `metric` for both models)."""
    names = [t for t in (tasks if tasks is not None else sorted(a)) if metric in a[t] and metric in b.get(t, {})]
    if not names:
        raise ValueError(f"no task has per-document {metric} for both models")
    xs, ys = {}, {}
    for t in names:
        if a[t]["doc_id"] != b[t]["doc_id"]:
            raise ValueError(f"task {t}: the two models were scored on different documents")
        xs[t], ys[t] = a[t][metric], b[t][metric]
    return score_diff(xs, ys)
