"""Paired statistics (rtk.paired): the bootstrap interval against a direct computation written out by hand, the
cases whose answer is known exactly, and the verdict's direction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rtk import paired


def _percentile(xs: list[float], q: float) -> float:
    """numpy's default (linear) percentile, by hand."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def test_score_interval_is_the_hand_written_resampling_loop():
    """Two tasks, per-document 0/1 scores of two models: each resample draws documents within each task (the
    same documents for both models) and averages the two task means."""
    a = {"piqa": [1, 0, 1, 1, 0, 1, 1, 0], "boolq": [1, 1, 0, 1, 1]}
    b = {"piqa": [0, 0, 1, 0, 0, 1, 1, 1], "boolq": [1, 0, 0, 0, 1]}
    got = paired.score_diff(a, b, resamples=500, seed=7)
    rng = np.random.default_rng(7)
    draws = {t: rng.integers(0, len(a[t]), size=(500, len(a[t]))).tolist() for t in sorted(a)}
    diffs = []
    for r in range(500):
        means = [sum(a[t][i] - b[t][i] for i in draws[t][r]) / len(a[t]) for t in sorted(a)]
        diffs.append(sum(means) / len(means))
    assert got["low"] == pytest.approx(_percentile(diffs, 2.5)) and got["high"] == pytest.approx(_percentile(diffs, 97.5))
    assert got["diff"] == pytest.approx((1 / 8 + 2 / 5) / 2) and got["n"] == {"boolq": 5, "piqa": 8}
    assert got["low"] < got["diff"] < got["high"]


def test_known_answers_and_the_verdicts_direction():
    same = paired.score_diff({"t": [1, 0, 1, 0]}, {"t": [1, 0, 1, 0]})
    assert (same["diff"], same["low"], same["high"], same["verdict"]) == (0, 0, 0, "no difference shown")
    ahead = paired.score_diff({"t": [1] * 30}, {"t": [0] * 30})  # every difference 1: the interval is [1, 1]
    assert (ahead["low"], ahead["high"], ahead["verdict"]) == (1, 1, "better")
    behind = paired.score_diff({"t": [0] * 30}, {"t": [1] * 30}, higher_is_better=True)
    assert behind["verdict"] == "worse"
    # PPL: A's NLL is B's + log(2) per token in every block -> A's PPL is exactly twice B's in every resample
    tok = [10, 20, 30]
    nb = [10 * 2.0, 20 * 2.5, 30 * 1.5]
    na = [x + n * math.log(2) for x, n in zip(nb, tok)]
    ppl_b = math.exp(sum(nb) / sum(tok))
    d = paired.ppl_diff(na, nb, tok)
    assert d["diff"] == pytest.approx(ppl_b) and d["low"] > 0 and d["verdict"] == "worse"  # higher PPL is worse
    assert paired.ppl_diff(nb, na, tok)["verdict"] == "better"
    assert paired.ppl_diff(nb, nb, tok)["verdict"] == "no difference shown"
    assert paired.verdict(-0.1, 0.2, True) == paired.verdict(0.0, 0.3, True) == "no difference shown"
    assert paired.verdict(0.01, 0.2, False) == "worse" and paired.verdict(-0.3, -0.01, False) == "better"


def test_ppl_interval_is_the_hand_written_block_resampling():
    nll_a, nll_b, tok = [30.0, 41.0, 25.0, 60.0], [28.0, 40.0, 27.0, 52.0], [15, 15, 15, 15]
    got = paired.ppl_diff(nll_a, nll_b, tok, resamples=300, seed=3)
    draws = np.random.default_rng(3).integers(0, 4, size=(300, 4)).tolist()
    diffs = [math.exp(sum(nll_a[i] for i in d) / sum(tok[i] for i in d))
             - math.exp(sum(nll_b[i] for i in d) / sum(tok[i] for i in d)) for d in draws]
    assert got["low"] == pytest.approx(_percentile(diffs, 2.5)) and got["high"] == pytest.approx(_percentile(diffs, 97.5))


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same tasks"):
        paired.score_diff({"a": [1]}, {"b": [1]})
    with pytest.raises(ValueError, match="not one paired set"):
        paired.score_diff({"a": [1, 0]}, {"a": [1]})
    with pytest.raises(ValueError, match="same blocks"):
        paired.ppl_diff([1.0], [1.0, 2.0], [3])
