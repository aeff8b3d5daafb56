"""The work `rtk prune`, its `select:` and `rtk ablate` share before they search: `prepare(recipe)` loads the
model where the recipe says, cuts the calibration and evaluation blocks, lists the candidates of both families,
counts the parameters a target is a fraction of, makes the stop rule and the speed model (a measured
`cost.profile`, else the roofline), and keeps the scorer of each criterion (rtk.prune.criteria) once built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from rtk.data import token_blocks
from rtk.errors import RtkError
from rtk.model.params import counted_params, total_params
from rtk.model.speed import SpeedModel, speed_model
from rtk.model.sublayer import sublayer_name
from rtk.prune.config import CANDIDATE_FAMILIES, Recipe, judge_text
from rtk.prune.criteria import CRITERIA
from rtk.prune.scoring import Loaded, candidates, existing_names, load_for_scoring
from rtk.prune.search import Candidate, StopRule, check_reachable

@dataclass
class Setup:
    """What a search starts from (built by `prepare`); its criteria's scorers are made on first use."""

    recipe: Recipe  # device and dtype resolved
    loaded: Loaded
    calib: object  # the calibration blocks (token ids) and their record
    calib_info: dict
    evalb: object  # the evaluation blocks and their record
    eval_info: dict
    speed: SpeedModel
    cands: dict[str, list[Candidate]]  # family -> its candidates, in model order, the protected left out
    params_total: int
    params_counted: int  # what a params_removed target is a fraction of (search.target.count)
    pool: object = None  # Ray workers (scoring.workers > 1)
    progress: bool = True
    # criterion -> its scorer, wrap(name, built), kept once made; rank(name, pieces, compute) gives one-pass scores:
    # rtk ablate's wrap and rank persist them in its state folder
    wrap: Callable[[str, object], object] = lambda name, scorer: scorer
    rank: Callable[[str, dict, Callable[[], dict]], dict] = lambda name, pieces, compute: compute()
    scorers: dict = field(default_factory=dict)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def stop_rule(self, **rules) -> StopRule:
        """The recipe's stop rule (search.target), or the `rules` given (rtk ablate's targets)."""
        target = self.recipe.search.target
        return StopRule(params_total=self.params_counted, speed=self.speed.speedup, count=target.count,
                        **(rules or target.rules()))

    def scorer(self, name: str):
        """Criterion `name`'s scorer over the calibration blocks, built on first use."""
        if name not in self.scorers:
            self.scorers[name] = self.wrap(name, CRITERIA[name].scorer(self))
        return self.scorers[name]

    def ranking(self, name: str, pieces: dict) -> dict:
        """Criterion `name`'s one-pass score of each piece ({name: consecutive candidates})."""
        return self.rank(name, pieces, lambda: CRITERIA[name].one_pass(self, pieces))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.loaded.close()


def check_protect(recipe: Recipe, model) -> None:
    """search.protect names sublayers this model has (one line naming those it has not)."""
    names = existing_names(model)
    bad = [p for p in recipe.search.protect if p not in names]
    if bad:
        last = len(model.model.layers) - 1
        raise RtkError(f"search.protect: {', '.join(bad)} does not exist in this model "
                       f"({last + 1} layers: {sublayer_name('attn', 0)}..{sublayer_name('attn', last)}, "
                       f"{sublayer_name('mlp', 0)}..{sublayer_name('mlp', last)})")


def check_lengths(model, recipe: Recipe) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    specs = [("data.calibration", recipe.data.calibration), ("data.evaluation", recipe.data.evaluation)]
    if recipe.select is not None:
        specs.append(("select.judge", judge_text(recipe.select)))
    for name, spec in specs:
        if limit and spec.seq_len > limit:
            raise RtkError(f"{name}.seq_len: {spec.seq_len} is longer than the model's "
                           f"max_position_embeddings ({limit})")


def prepare(recipe: Recipe, progress: bool = True, echo: Callable[[str], None] = print, reach: bool = True,
            **hooks) -> Setup:
    """The shared setup of a recipe whose device and dtype are resolved. `reach`: refuse a search.target the
    recipe's candidates cannot reach (rtk ablate sets its own targets); `hooks`: Setup's wrap / rank. With Ray
    workers (scoring.workers > 1) the actors score on their devices and the driver's copy stays on the CPU."""
    sc = recipe.scoring
    loaded = load_for_scoring(recipe, device="cpu" if sc.workers > 1 else None)
    try:
        model = loaded.model
        check_protect(recipe, model)
        check_lengths(model, recipe)
        calib, calib_info = token_blocks(loaded.tokenizer, recipe.data.calibration, "data.calibration")
        evalb, eval_info = token_blocks(loaded.tokenizer, recipe.data.evaluation, "data.evaluation")
        speed = speed_model(model.config, recipe.cost)
        cost_fn = speed.cost_fn()
        cands = {f: candidates(model, f, recipe.search.protect, cost_fn) for f in CANDIDATE_FAMILIES}
        setup = Setup(recipe, loaded, calib, calib_info, evalb, eval_info, speed, cands, total_params(model),
                      counted_params(model, recipe.search.target.count), progress=progress, **hooks)
        if reach:
            check_reachable(cands[recipe.search.candidates], setup.stop_rule(), speed.describe()["model"])
        if sc.workers > 1:
            from rtk.prune.scoring.workers import WorkerPool

            setup.pool = WorkerPool(recipe, sc.workers, sc.ray_address, echo)
    except BaseException:
        loaded.close()
        raise
    return setup
