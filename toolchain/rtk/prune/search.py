"""Which sublayers to remove: progressive, one-shot and global search, pure functions of a scorer.

A scorer answers two questions about the model with a set of sublayers removed:
``ppl(removed)`` and ``score(removed, candidates)`` -> PPL of the model with each candidate
removed in addition. Everything here is deterministic given those answers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

from rtk.errors import RtkError
from rtk.model.sublayer import Sublayer


@dataclass(frozen=True)
class Candidate:
    name: str  # "attn.3", "mlp.7" or "layer.5"
    layer: int
    kind: str  # "attn" | "mlp" | "layer"
    params: int
    cost: float = 0.0  # serving cost removed (normalize: cost); 0 when unused

    @property
    def parts(self) -> tuple[str, ...]:
        """The sublayers this candidate removes (its Sublayer's)."""
        return Sublayer(self.layer, self.kind).parts


class Scorer(Protocol):
    def ppl(self, removed: frozenset[str]) -> float: ...

    def score(self, removed: frozenset[str], candidates: list[Candidate]) -> dict[str, float]: ...


def relative_impact(ppl_without: float, ppl_current: float) -> float:
    """RI(s) = (PPL(M \\ s) - PPL(M)) / PPL(M)."""
    return (ppl_without - ppl_current) / ppl_current


def normalized(ri: float, cand: Candidate, normalize: str) -> float:
    """NRI: RI per unit of what removing the candidate saves."""
    if normalize == "none":
        return ri
    if normalize == "params":
        return ri / cand.params
    if normalize == "cost":
        return ri / cand.cost
    raise ValueError(f"unknown normalize '{normalize}'")


@dataclass
class StopRule:
    params_total: int  # the parameters a params_removed target counts (all, or the non-embedding ones: `count`)
    params_removed: Optional[float] = None
    ppl_increase: Optional[float] = None
    ppl_max: Optional[float] = None
    sublayers: Optional[int] = None
    speedup: Optional[float] = None
    speed: Optional[Callable[[Iterable[str]], float]] = None  # removed sublayers -> predicted speedup
    count: str = "all"  # what params_total counts (recipe search.target.count)

    def ppl_budget(self, ppl_base: float) -> Optional[float]:
        if self.ppl_max is not None:
            return self.ppl_max
        if self.ppl_increase is not None:
            return ppl_base * (1.0 + self.ppl_increase)
        return None

    def reached(self, removed_params: int, removed_count: int, removed: Iterable[str] = ()) -> bool:
        """True when the count/fraction/speed rules are satisfied (PPL rules stop on overshoot)."""
        if self.params_removed is not None:
            return removed_params >= self.params_removed * self.params_total - 1e-9
        if self.sublayers is not None:
            return removed_count >= self.sublayers
        if self.speedup is not None:
            return self.speed(removed) >= self.speedup
        return False


def _entry(cand: Candidate, ri: float, nri: float, ppl_after: float) -> dict:
    return {"name": cand.name, "layer": cand.layer, "kind": cand.kind, "params": cand.params,
            "ri": ri, "nri": nri, "ppl_after": ppl_after}


def _removed_set(state: dict, by_name: dict[str, Candidate]) -> frozenset[str]:
    return frozenset(p for e in state["removed"] for p in by_name[e["name"]].parts)


def check_reachable(cands: list[Candidate], stop: StopRule, speed_source: str = "predicted") -> None:
    avail = sum(c.params for c in cands)
    if stop.params_removed is not None and avail < stop.params_removed * stop.params_total:
        counted = "parameters" if stop.count == "all" else "non-embedding parameters"
        raise RtkError(
            f"search.target.params_removed: {stop.params_removed:.0%} of {stop.params_total:,} {counted} "
            f"cannot be reached: the sublayers that are not protected hold only "
            f"{avail:,} ({avail / stop.params_total:.1%})"
            + ("; the embedding and LM head are never removed (search.target.count: non_embedding counts "
               "the rest)" if stop.count == "all" else "")
        )
    if stop.speedup is not None:
        most = stop.speed([p for c in cands for p in c.parts])
        if most < stop.speedup:
            raise RtkError(f"search.target.speedup: {stop.speedup:g} cannot be reached: removing every candidate "
                           f"that is not protected is predicted {most:.3f}x ({speed_source})")
    if stop.sublayers is not None and stop.sublayers > len(cands):
        raise RtkError(
            f"search.target.sublayers: {stop.sublayers} cannot be reached: only {len(cands)} "
            "candidates are not protected"
        )


def new_state(method: str) -> dict:
    return {"method": method, "ppl_base": None, "ppl_current": None, "removed": [], "steps": [], "done": False}


def run_search(
    scorer: Scorer,
    cands: list[Candidate],
    stop: StopRule,
    method: str = "progressive",
    normalize: str = "params",
    state: Optional[dict] = None,
    save: Callable[[dict], None] = lambda s: None,
    log: Callable[[str], None] = lambda s: None,
    rescoring: str = "full",
) -> dict:
    """Run (or continue) a search. ``state`` is the JSON-able record saved after every step.

    ``rescoring`` (progressive only): ``full`` scores every remaining candidate at every step (the paper's);
    ``lazy`` scores everything once, then at each step re-scores candidates in the order of their last known
    NRI, LAZY_BATCH at a time, and stops as soon as the best fresh NRI is no higher than the next candidate's
    last known one. It picks what ``full`` picks whenever removing a sublayer never lowers another's NRI; on
    SmolLM2 that fails (a removal can make a neighbour nearly free) and the plan differs from step 6: an
    option, not the default (bench/RESULTS.md, "Search cost")."""
    check_reachable(cands, stop)
    by_name = {c.name: c for c in cands}
    state = state or new_state(method)
    if state["ppl_base"] is None:
        state["ppl_base"] = state["ppl_current"] = scorer.ppl(frozenset())
        save(state)
    budget = stop.ppl_budget(state["ppl_base"])
    key = lambda item: (item[1]["nri"], cands.index(by_name[item[0]]))  # noqa: E731  ties: model order

    def removed_params() -> int:
        return sum(e["params"] for e in state["removed"])

    def finished() -> bool:
        return state["done"] or stop.reached(removed_params(), len(state["removed"]), _removed_set(state, by_name))

    if method in ("one-shot", "global") and not state["steps"]:
        scores = _score_step(scorer, cands, frozenset(), state, normalize, by_name)
        if method == "global":
            state["steps"][0]["chosen"] = global_choice(cands, scores, stop)
        save(state)

    while not finished():
        removed = _removed_set(state, by_name)
        taken = {e["name"] for e in state["removed"]}
        remaining = [c for c in cands if c.name not in taken]
        if not remaining:
            break
        if method == "progressive" and rescoring == "lazy" and state["steps"]:
            scores = _lazy_step(scorer, remaining, removed, state, normalize, by_name, key)
            name, s = min(scores.items(), key=key)
            ppl_after = s["ppl"]
        elif method == "progressive":
            scores = _score_step(scorer, remaining, removed, state, normalize, by_name)
            name, s = min(scores.items(), key=key)
            ppl_after = s["ppl"]
        else:
            pool = state["steps"][0]["scores"].items()
            if method == "global":  # the chosen set, most harmless first
                chosen = set(state["steps"][0]["chosen"]) - taken
                if not chosen:
                    break
                pool = [(n, sc) for n, sc in pool if n in chosen]
            ranked = sorted(((n, s) for n, s in pool if n not in taken), key=key)
            name, s = ranked[0]
            ppl_after = scorer.ppl(removed | frozenset(by_name[name].parts))
        if budget is not None and ppl_after > budget:
            log(f"stop: removing {name} would raise PPL to {ppl_after:.3f} > budget {budget:.3f}")
            state["done"] = True
            break
        cand = by_name[name]
        state["removed"].append(_entry(cand, s["ri"], s["nri"], ppl_after))
        state["ppl_current"] = ppl_after
        log(f"removed {name:8s} ri={s['ri']:+.4f} ppl={ppl_after:.3f} "
            f"params removed={removed_params() / stop.params_total:.1%}")
        save(state)
    state["done"] = True
    save(state)
    return state


def _scores(scorer, cands, removed, ppl_cur, normalize) -> dict:
    ppls = scorer.score(removed, cands)
    scores = {}
    for c in cands:
        p = ppls[c.name]
        ri = relative_impact(p, ppl_cur) if math.isfinite(p) else math.inf
        scores[c.name] = {"ppl": p, "ri": ri, "nri": normalized(ri, c, normalize)}
    return scores


def _record_step(state, scores, **extra) -> None:
    state["steps"].append({"step": len(state["steps"]), "ppl_current": state["ppl_current"],
                           "removed_before": [e["name"] for e in state["removed"]], "scores": scores, **extra})


def _score_step(scorer, remaining, removed, state, normalize, by_name) -> dict:
    scores = _scores(scorer, remaining, removed, state["ppl_current"], normalize)
    _record_step(state, scores)
    return scores


LAZY_BATCH = 4  # candidates re-scored together (one pass of the layer-major engine serves them all)


def _lazy_step(scorer, remaining, removed, state, normalize, by_name, key) -> dict:
    """Re-score only the candidates that can still be the minimum (see run_search); returns the fresh scores."""
    last: dict[str, float] = {}
    for step in reversed(state["steps"]):  # each candidate's most recent score (resumable: all in the state)
        for n, sc in step["scores"].items():
            last.setdefault(n, sc["nri"])
    order = sorted(remaining, key=lambda c: key((c.name, {"nri": last[c.name]})))
    fresh: dict = {}
    while len(fresh) < len(order):
        todo = [c for c in order if c.name not in fresh][:LAZY_BATCH]
        fresh.update(_scores(scorer, todo, removed, state["ppl_current"], normalize))
        nxt = next((c for c in order if c.name not in fresh), None)
        if nxt is None or key(min(fresh.items(), key=key)) <= key((nxt.name, {"nri": last[nxt.name]})):
            break
    _record_step(state, fresh, lazy=True)
    return fresh


def ranked_removal(ranking: dict[str, float], cands: list[Candidate], stop: StopRule, scorer,
                   ppl_base: float) -> dict:
    """One-shot removal in ascending `ranking` order (e.g. block influence) until `stop`; PPL measured after each
    removal."""
    check_reachable(cands, stop)
    order = sorted(cands, key=lambda c: (ranking[c.name], cands.index(c)))
    state = {"method": "one-shot", "ppl_base": ppl_base, "ppl_current": ppl_base, "removed": [],
             "ranking": {c.name: ranking[c.name] for c in cands}, "done": False}
    gone: frozenset[str] = frozenset()
    for c in order:
        if stop.reached(sum(e["params"] for e in state["removed"]), len(state["removed"]), gone):
            break
        gone = gone | frozenset(c.parts)
        ppl = scorer.ppl(gone)
        state["removed"].append({"name": c.name, "layer": c.layer, "kind": c.kind, "params": c.params,
                                 "ri": None, "nri": None, "score": ranking[c.name], "ppl_after": ppl})
        state["ppl_current"] = ppl
    state["done"] = True
    return state


def global_choice(cands: list[Candidate], scores: dict, stop: StopRule) -> list[str]:
    """method: global: the set of candidates whose step-0 RIs sum lowest among all sets that reach a
    params_removed target (an exact covering knapsack; one-shot ranks by RI / params and takes a prefix, which
    can overshoot the target or pass over a cheaper mix). Returned in model order."""
    if stop.params_removed is None:
        raise RtkError("search.method: global supports target params_removed (its budget adds up); "
                       "use progressive or one-shot for other targets")
    need = stop.params_removed * stop.params_total
    picked = cover_knapsack([c.params for c in cands], [scores[c.name]["ri"] for c in cands], need)
    return [cands[i].name for i in sorted(picked)]


def cover_knapsack(weights: list[float], costs: list[float], need: float, max_states: int = 200_000) -> list[int]:
    """Indices of items whose weights sum to at least `need` at the least total cost. Items of cost <= 0 are
    always taken; the rest by dynamic programming over the weight reached, capped at `need`. Weights are
    counted in units (their common divisor when they are integers and that keeps the table small, else need /
    max_states, rounded down: the chosen set then still covers `need`, at most one unit per item from exact)."""
    n = len(weights)
    take = [i for i in range(n) if costs[i] <= 0]
    left = need - sum(weights[i] for i in take)
    rest = [i for i in range(n) if 0 < costs[i] < math.inf]
    if left <= 0:
        return take
    if sum(weights[i] for i in rest) < left:
        raise RtkError(f"search.target: {need:,.0f} cannot be covered by the candidates")
    unit = 0
    if all(float(weights[i]).is_integer() for i in rest):
        unit = math.gcd(*[int(weights[i]) for i in rest])
    if not unit or left / unit > max_states:
        unit = left / max_states
    full = math.ceil(left / unit - 1e-9)
    w = [min(full, int(weights[i] // unit)) for i in rest]
    full = min(full, sum(w))  # rounding down lost the last unit: then only all of `rest` (a true cover) reaches it
    states: dict[int, float] = {0: 0.0}
    history = []
    for k, i in enumerate(rest):
        new, back = dict(states), {}
        for at, cost in states.items():
            to, value = min(full, at + w[k]), cost + costs[i]
            if value < new.get(to, math.inf):
                new[to], back[to] = value, at
        history.append(back)
        states = new
    at = full
    for k in reversed(range(len(rest))):
        if at in history[k]:
            take.append(rest[k])
            at = history[k][at]
    return take
