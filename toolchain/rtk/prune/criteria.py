"""The criteria a removal is judged by, one table: `search.criterion`, `select.criteria` and rtk ablate's variants
name its entries. Each entry builds what scores a candidate over the calibration blocks and turns its results into
calibration PPL (what every plan.json's ppl_after holds); `removal_order` runs any of them to a stop rule.

- ppl: the relative impact (RI) on calibration PPL (the paper's), re-measured after every removal as the search
  method says;
- kl: the same RI, measured on exp(mean KL) from the original model's next-token distributions;
- bi: block influence (ShortGPT: 1 - cos of the residual stream around the piece), one pass of the dense model,
  removal in ascending order (rtk.prune.scoring.influence).

A new criterion is one entry here plus its scoring code. Its entries are given a setup (rtk.prune.prepare.Setup):
what they build comes from its recipe, model and calibration blocks, and `Setup.scorer(name)` keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from rtk.prune.search import Candidate, normalized, ranked_removal, run_search


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str  # what RI is measured on (the report's line)
    # a criterion searched with a scorer (ppl, kl): setup -> its scorer over the calibration blocks
    scorer: Optional[Callable[[object], object]] = None
    # a criterion ranked once (bi): (setup, {name: consecutive candidates}) -> the score of each piece
    one_pass: Optional[Callable[[object, dict], dict]] = None
    # a finished search state in calibration PPL (the calibration PPL scorer given)
    in_calibration_ppl: Callable[[dict, object], dict] = lambda state, ppl: state
    measures_ppl: bool = True  # its search measures calibration PPL at each step (a ppl_increase / ppl_max target)
    ray: bool = True  # scores on Ray workers (scoring.workers > 1)

    def piece_scores(self, setup, pieces: dict[str, list[Candidate]]) -> dict[str, float]:
        """Lower is more removable: each piece's score (the model without it, or its one-pass score)."""
        if self.one_pass is not None:
            return setup.ranking(self.name, pieces)
        s = setup.scorer(self.name)
        return {k: s.ppl(frozenset(p for c in run for p in c.parts)) for k, run in pieces.items()}


def _ppl_scorer(setup):
    from rtk.prune.scoring import scorer_for

    return scorer_for(setup.recipe, setup.loaded, setup.calib, setup.progress, setup.pool, "calibration")


def _kl_scorer(setup):
    """exp(mean KL) from the original model's log-probs on the calibration blocks."""
    from rtk.model.ppl import teacher_logprobs
    from rtk.prune.scoring import scorer_for

    ref = teacher_logprobs(setup.loaded.model, setup.calib, setup.recipe.scoring.batch_size)
    return scorer_for(setup.recipe, setup.loaded, setup.calib, setup.progress, setup.pool, "calibration-kl",
                      teacher_logprobs=ref)


def _influence(setup, pieces: dict) -> dict:
    from rtk.prune.scoring.influence import piece_influence

    return piece_influence(setup.loaded.model, setup.calib, pieces, setup.recipe.scoring.batch_size)


def kl_in_calibration_ppl(state: dict, scorer) -> dict:
    """A KL search's state in calibration PPL (a copy): each removal's ppl_after becomes the calibration PPL
    `scorer` measures for the set removed so far, ppl_base / ppl_current too; the exp(mean KL) values are kept
    beside them (kl_exp_after, kl_exp_base, kl_exp_current). A state already converted is returned as it is."""
    from rtk.model.sublayer import expand

    if "kl_exp_base" in state or any("kl_exp_after" in e for e in state["removed"]):
        return state
    state = {**state, "removed": [dict(e) for e in state["removed"]]}
    gone = frozenset()
    for e in state["removed"]:
        gone = gone | frozenset(expand([e["name"]]))
        e["kl_exp_after"], e["ppl_after"] = e["ppl_after"], scorer.ppl(gone)
    state["kl_exp_base"], state["kl_exp_current"] = state["ppl_base"], state["ppl_current"]
    state["ppl_base"] = scorer.ppl(frozenset())
    state["ppl_current"] = state["removed"][-1]["ppl_after"] if state["removed"] else state["ppl_base"]
    return state


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("ppl", "RI from calibration PPL", scorer=_ppl_scorer),
    Criterion("kl", "RI from exp(mean KL) to the original on the calibration blocks; the PPLs here are calibration "
              "PPL", scorer=_kl_scorer, in_calibration_ppl=kl_in_calibration_ppl, measures_ppl=False, ray=False),
    Criterion("bi", "block influence, 1 - cos of the residual stream around the piece, one pass of the dense model",
              one_pass=_influence, measures_ppl=False),
)}
SEARCHED = tuple(n for n, c in CRITERIA.items() if c.scorer is not None)  # what search.criterion may name


def describe(name: str) -> str:
    return f"{name} ({CRITERIA[name].description})"


def removal_order(name: str, setup, cands: list[Candidate], stop, method: str, normalize: str, *,
                  state: Optional[dict] = None, save: Callable[[dict], None] = lambda s: None,
                  log: Callable[[str], None] = lambda s: None, rescoring: str = "full") -> dict:
    """Criterion `name`'s removals from `cands` until `stop` (resumed from `state`; a finished one is returned as
    it is), in calibration PPL: a searched criterion runs `method` with its scorer; a ranked one removes in
    ascending (normalized) one-pass score, measuring the calibration PPL after each removal."""
    crit, ppl = CRITERIA[name], setup.scorer("ppl")
    if state and state.get("done"):
        return crit.in_calibration_ppl(state, ppl)
    if crit.one_pass is not None:
        raw = crit.piece_scores(setup, {c.name: [c] for c in cands})
        ranking = {c.name: normalized(raw[c.name], c, normalize) for c in cands}
        state = ranked_removal(ranking, cands, stop, ppl, ppl.ppl(frozenset()))
        state["steps"] = [{"step": 0, "criterion": name,
                           "scores": {c.name: {name: raw[c.name], "nri": ranking[c.name]} for c in cands}}]
    else:
        state = run_search(setup.scorer(name), cands, stop, method, normalize, state=state, save=save, log=log,
                           rescoring=rescoring)
        state = crit.in_calibration_ppl(state, ppl)
    state["criterion"] = name
    save(state)
    return state
