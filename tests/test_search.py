"""RI / NRI arithmetic, search orders and stop rules on scripted scorers (no model)."""
import math

import pytest

from rtk.errors import RtkError
from rtk.prune.search import Candidate, StopRule, normalized, relative_impact, run_search


class ScriptedScorer:
    """PPL = base * prod(factor of each removed sublayer) * interaction terms."""

    def __init__(self, base, factors, interactions=None):
        self.base, self.factors, self.inter = base, factors, interactions or {}
        self.calls = []

    def _ppl(self, removed):
        p = self.base
        for n in removed:
            p *= self.factors[n]
        for pair, f in self.inter.items():
            if set(pair) <= set(removed):
                p *= f
        return p

    def ppl(self, removed):
        self.calls.append(("ppl", frozenset(removed)))
        return self._ppl(removed)

    def score(self, removed, cands):
        self.calls.append(("score", frozenset(removed), tuple(c.name for c in cands)))
        return {c.name: self._ppl(set(removed) | set(c.parts)) for c in cands}


def C(name, params):
    kind, i = name.split(".")
    return Candidate(name=name, layer=int(i), kind=kind, params=params)


def test_ri_and_nri_hand_checked():
    assert relative_impact(12.0, 10.0) == pytest.approx(0.2)
    assert relative_impact(9.0, 10.0) == pytest.approx(-0.1)
    c = C("mlp.1", 400)
    assert normalized(0.2, c, "params") == pytest.approx(0.0005)
    assert normalized(0.2, c, "none") == pytest.approx(0.2)
    # negative RI: the one that improves most per parameter goes first
    assert normalized(-0.1, C("attn.1", 100), "params") < normalized(-0.1, C("mlp.1", 400), "params")


CANDS = [C("attn.1", 100), C("mlp.1", 300), C("attn.2", 100), C("mlp.2", 300)]
TOTAL = 1000


def test_normalize_changes_the_order():
    # attn.1: +2% for 100 params (NRI 2e-4); mlp.1: +3% for 300 params (NRI 1e-4)
    f = {"attn.1": 1.02, "mlp.1": 1.03, "attn.2": 1.05, "mlp.2": 1.10}
    by_params = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, sublayers=2), normalize="params")
    by_none = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, sublayers=2), normalize="none")
    assert [e["name"] for e in by_params["removed"]] == ["mlp.1", "attn.1"]
    assert [e["name"] for e in by_none["removed"]] == ["attn.1", "mlp.1"]
    e = by_params["removed"][0]
    assert e["ri"] == pytest.approx(0.03) and e["nri"] == pytest.approx(0.03 / 300)
    assert e["ppl_after"] == pytest.approx(10.3)


def test_progressive_vs_one_shot_orders():
    # alone, attn.2 is cheapest after attn.1; but once attn.1 is gone, attn.2 hurts a lot (interaction)
    f = {"attn.1": 1.01, "mlp.1": 1.05, "attn.2": 1.02, "mlp.2": 1.08}
    inter = {("attn.1", "attn.2"): 1.5}
    rule = StopRule(TOTAL, sublayers=3)
    prog = run_search(ScriptedScorer(10.0, f, inter), CANDS, rule, method="progressive", normalize="none")
    one = run_search(ScriptedScorer(10.0, f, inter), CANDS, rule, method="one-shot", normalize="none")
    assert [e["name"] for e in one["removed"]] == ["attn.1", "attn.2", "mlp.1"]
    assert [e["name"] for e in prog["removed"]] == ["attn.1", "mlp.1", "mlp.2"]
    # progressive re-scores each step against the current model; one-shot scores once
    assert len(prog["steps"]) == 3 and len(one["steps"]) == 1
    assert prog["steps"][1]["ppl_current"] == pytest.approx(10.1)
    # one-shot measures the result of every removal
    assert one["removed"][1]["ppl_after"] == pytest.approx(10.0 * 1.01 * 1.02 * 1.5)


def test_negative_ri_goes_first():
    f = {"attn.1": 0.98, "mlp.1": 1.0001, "attn.2": 0.99, "mlp.2": 0.97}
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, sublayers=1), normalize="params")
    # mlp.2: -3% / 300 = -1e-4 ; attn.1: -2% / 100 = -2e-4 -> attn.1 improves most per parameter
    assert st["removed"][0]["name"] == "attn.1"


def test_stop_params_fraction():
    f = {n: 1.01 for n in ("attn.1", "mlp.1", "attn.2", "mlp.2")}
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, params_removed=0.35), normalize="none")
    removed = sum(e["params"] for e in st["removed"])
    assert removed >= 350 and removed - st["removed"][-1]["params"] < 350


def test_stop_ppl_budget_relative_and_absolute():
    f = {"attn.1": 1.05, "mlp.1": 1.10, "attn.2": 1.20, "mlp.2": 1.40}
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, ppl_increase=0.2), normalize="none")
    assert [e["name"] for e in st["removed"]] == ["attn.1", "mlp.1"]  # 10.5, 11.55; +attn.2 -> 13.86 > 12
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, ppl_max=10.6), normalize="none")
    assert [e["name"] for e in st["removed"]] == ["attn.1"]
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, ppl_increase=0.2), method="one-shot",
                    normalize="none")
    assert [e["name"] for e in st["removed"]] == ["attn.1", "mlp.1"]


def test_stop_sublayer_count():
    f = {n: 1.01 for n in ("attn.1", "mlp.1", "attn.2", "mlp.2")}
    st = run_search(ScriptedScorer(10.0, f), CANDS, StopRule(TOTAL, sublayers=3))
    assert len(st["removed"]) == 3


def test_unreachable_targets_are_refused():
    with pytest.raises(RtkError, match="params_removed: 90% of 1,000 parameters cannot be reached"):
        run_search(ScriptedScorer(10.0, {}), CANDS, StopRule(TOTAL, params_removed=0.9))
    with pytest.raises(RtkError, match="sublayers: 5 cannot be reached"):
        run_search(ScriptedScorer(10.0, {}), CANDS, StopRule(TOTAL, sublayers=5))


def test_resume_gives_the_same_plan():
    f = {"attn.1": 1.02, "mlp.1": 1.03, "attn.2": 1.05, "mlp.2": 1.10}
    inter = {("attn.1", "mlp.1"): 1.2}
    rule = StopRule(TOTAL, sublayers=3)
    full = run_search(ScriptedScorer(10.0, f, inter), CANDS, rule)

    saved = []

    class Stop(Exception):
        pass

    def save(state):
        import copy

        saved.append(copy.deepcopy(state))
        if len(state["removed"]) == 1:
            raise Stop

    with pytest.raises(Stop):
        run_search(ScriptedScorer(10.0, f, inter), CANDS, rule, save=save)
    scorer = ScriptedScorer(10.0, f, inter)
    resumed = run_search(scorer, CANDS, rule, state=saved[-1])
    assert [e["name"] for e in resumed["removed"]] == [e["name"] for e in full["removed"]]
    assert resumed["steps"] == full["steps"]
    assert not any(c[0] == "ppl" for c in scorer.calls)  # the base PPL was not measured again
    assert math.isclose(resumed["ppl_current"], full["ppl_current"])
