"""`rtk ablate`: the method, its ablations and whole-layer baselines, from one base model, at the same
parameter targets, with shared work done once.

Variants (a table, not forks of the code; each names a candidate family, a search method, a normalization and a
criterion of rtk.prune.criteria): ``normalize: params | none | cost`` x ``search: progressive | one-shot`` over
sublayers, greedy whole-layer removal by PPL, one-shot whole-layer removal by block influence (ShortGPT), and the
method and greedy whole-layer removal by KL. Sharing (rtk.prune.prepare's setup, its scorers cached):

- one scorer cache keyed by the *set of removed sublayers* serves every variant: the dense model's
  step-0 PPLs are computed once and are both every progressive search's first step and every
  one-shot ranking (RI is the same for every normalization, only the division differs), and any set
  two variants both visit is measured once;
- progressive searches are nested across parameter targets (a step's choice does not depend on the
  target), so each runs once to the largest target and smaller targets are prefixes of its removals.

Work in progress lives in ``OUT.partial/state`` (scores, search states, evaluations, saved as they are
made); a rerun of the same command resumes; OUT appears only when complete.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rtk.errors import RtkError
from rtk.outdir import fingerprint
from rtk.prune.config import Recipe
from rtk.prune.criteria import CRITERIA, removal_order
from rtk.prune.search import Candidate, StopRule


@dataclass(frozen=True)
class Variant:
    name: str
    candidates: str  # "sublayers" | "blocks"
    method: str  # "progressive" | "one-shot"
    normalize: str  # "params" | "none" | "cost"
    rank: str  # the criterion (an entry of rtk.prune.criteria.CRITERIA): ppl, kl or bi
    label: str

    def __post_init__(self):
        if self.rank not in CRITERIA:
            raise ValueError(f"variant {self.name}: rank '{self.rank}' is not a criterion ({', '.join(CRITERIA)})")


VARIANTS = [
    Variant("params-progressive", "sublayers", "progressive", "params", "ppl", "RI/params, progressive (the method)"),
    Variant("params-oneshot", "sublayers", "one-shot", "params", "ppl", "RI/params, one-shot"),
    Variant("none-progressive", "sublayers", "progressive", "none", "ppl", "RI (no normalization), progressive"),
    Variant("none-oneshot", "sublayers", "one-shot", "none", "ppl", "RI (no normalization), one-shot"),
    Variant("cost-progressive", "sublayers", "progressive", "cost", "ppl", "RI/serving cost, progressive"),
    Variant("cost-oneshot", "sublayers", "one-shot", "cost", "ppl", "RI/serving cost, one-shot"),
    Variant("blocks-ppl", "blocks", "progressive", "none", "ppl", "whole layers, greedy by PPL"),
    Variant("blocks-bi", "blocks", "one-shot", "none", "bi", "whole layers, one-shot by block influence"),
    # the KL criterion: RI measured as exp(mean KL) from the original model's next-token distributions on the
    # calibration blocks instead of their PPL
    Variant("params-progressive-kl", "sublayers", "progressive", "params", "kl", "RI/params by KL, progressive"),
    Variant("blocks-kl", "blocks", "progressive", "none", "kl", "whole layers, greedy by KL"),
]
# cheap variants first, then the method, so the most telling results appear early
RUN_ORDER = ["params-oneshot", "none-oneshot", "cost-oneshot", "blocks-bi", "params-progressive",
             "blocks-ppl", "cost-progressive", "none-progressive", "blocks-kl", "params-progressive-kl"]


def select_variants(names: Optional[str]) -> list[Variant]:
    """All variants, or those named in a comma-separated list, in RUN_ORDER."""
    by_name = {v.name: v for v in VARIANTS}
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        bad = [n for n in wanted if n not in by_name]
        if bad or not wanted:
            raise RtkError(f"--variants: unknown variant(s) {', '.join(bad) or '(none given)'}; "
                           f"known: {', '.join(by_name)}")
    else:
        wanted = list(by_name)
    return [by_name[n] for n in RUN_ORDER if n in wanted]


def parse_targets(text: str) -> list[float]:
    try:
        ts = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise RtkError(f"--targets: '{text}' is not a comma-separated list of fractions like 0.1,0.2,0.3") from None
    if not ts or any(not 0.0 < t < 1.0 for t in ts):
        raise RtkError(f"--targets: '{text}': give fractions of parameters inside (0, 1), e.g. 0.1,0.2,0.3")
    return ts


def _key(removed) -> str:
    return ",".join(sorted(removed))


class CachedScorer:
    """A scorer answering from a cache keyed by the set of removed sublayers.

    ``score(removed, cands)`` is ``{c: ppl(removed | c.parts)}``, so both questions share one cache;
    only the sets never seen go to the wrapped scorer (as one batched ``score`` call).
    ``on_new`` is called after new results arrive (to persist ``cache``).
    """

    def __init__(self, inner, cache: Optional[dict[str, float]] = None, on_new: Callable[[], None] = lambda: None):
        self.inner, self.cache, self.on_new = inner, dict(cache or {}), on_new
        self.hits = self.misses = 0

    def ppl(self, removed: frozenset[str] = frozenset()) -> float:
        k = _key(removed)
        if k in self.cache:
            self.hits += 1
        else:
            self.misses += 1
            self.cache[k] = self.inner.ppl(frozenset(removed))
            self.on_new()
        return self.cache[k]

    def score(self, removed: frozenset[str], cands: list[Candidate], desc: Optional[str] = None) -> dict[str, float]:
        keys = {c.name: _key(removed | frozenset(c.parts)) for c in cands}
        missing = [c for c in cands if keys[c.name] not in self.cache]
        self.hits += len(cands) - len(missing)
        self.misses += len(missing)
        if missing:
            got = self.inner.score(frozenset(removed), missing)
            for c in missing:
                self.cache[keys[c.name]] = got[c.name]
            self.on_new()
        return {c.name: self.cache[keys[c.name]] for c in cands}


def prefix_for(removed: list[dict], target: float, params_total: int) -> list[dict]:
    """The shortest prefix of a removal order that reaches `target` (exactly StopRule's test)."""
    stop = StopRule(params_total=params_total, params_removed=target)
    acc = 0
    for k, e in enumerate(removed):
        acc += e["params"]
        if stop.reached(acc, k + 1):
            return removed[: k + 1]
    raise RtkError(f"the removal order reaches only {acc / params_total:.1%} of parameters, short of {target:.0%}")


def ablation_fingerprint(recipe: Recipe, targets: list[float]) -> str:
    d = recipe.plan_settings()
    for k in ("method", "normalize", "target", "candidates"):  # the variants set these
        d["search"].pop(k, None)
    d["targets"] = targets
    return fingerprint(d)


def run_all(variants: list[Variant], setup, params_total: int, targets: list[float],
            states: Optional[dict] = None, save: Callable[[str, dict], None] = lambda n, s: None,
            log: Callable[[str], None] = lambda s: None,
            after_variant: Callable[[Variant, dict], None] = lambda v, s: None) -> dict[str, dict]:
    """Search every variant once to max(targets) with the shared (cached) scorers of `setup`
    (rtk.prune.prepare.Setup: scorer(criterion), ranking(criterion, pieces), cands); fills and returns `states`
    (variant name -> search state, in calibration PPL; states given are resumed)."""
    states = {} if states is None else states
    stop = StopRule(params_total=params_total, params_removed=max(targets))
    if any(v.rank == "ppl" and v.candidates == "sublayers" for v in variants):
        setup.scorer("ppl").score(frozenset(), setup.cands["sublayers"])  # step 0: shared by every sublayer variant
    for v in variants:
        t0 = time.perf_counter()
        log(f"{v.name}: {v.label}")
        st = removal_order(v.rank, setup, setup.cands[v.candidates], stop, v.method, v.normalize,
                           state=states.get(v.name), save=lambda s, n=v.name: save(n, s),
                           log=lambda s, n=v.name: log(f"{n}: {s}"))
        states[v.name] = st
        save(v.name, st)
        log(f"{v.name}: done, {len(st['removed'])} removed ({time.perf_counter() - t0:.0f} s)")
        after_variant(v, st)
    return states


def plans(states: dict[str, dict], variants: list[Variant], targets: list[float], params_total: int) -> list[dict]:
    """One row per (variant, target): what was removed, read off the variant's removal order. For a
    search still running, the targets it has reached (its prefixes are final: searches are nested)."""
    rows = []
    for v in variants:
        st = states[v.name]
        for t in targets:
            if not st.get("done"):  # an unfinished search: only the targets its removals already reached
                stop = StopRule(params_total=params_total, params_removed=t)
                if not stop.reached(sum(e["params"] for e in st["removed"]), len(st["removed"])):
                    continue
            pre = prefix_for(st["removed"], t, params_total)
            rows.append({"variant": v.name, "label": v.label, "target": t, "removed": [e["name"] for e in pre],
                         "calib_ppl": pre[-1]["ppl_after"] if pre else st["ppl_base"],
                         "calib_ppl_base": st["ppl_base"], "search_finished": bool(st.get("done"))})
    return rows


def clean_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
