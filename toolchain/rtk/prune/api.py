"""`rtk.prune(recipe, out=...)`: `rtk prune` in process (rtk.cli.prune is a thin layer over it).

    result = rtk.prune("recipes/smollm2-demo.yaml", out="runs/demo")   # or a recipe as a dict
    result.removed, result.ppl_before, result.ppl_after, result.model_dir

A bad recipe or model raises RtkError with the line the command prints, before anything is written; OUT
appears only when complete (rtk.prune.run). `max_steps` pauses on purpose: SearchPaused, and the same call
continues.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from rtk.errors import RtkError
from rtk.plan import PLAN_FILE
from rtk.prune.config import Recipe, load_recipe, parse_recipe
from rtk.prune.run import SearchPaused

__all__ = ["PruneResult", "SearchPaused", "prune", "default_out"]


@dataclass(frozen=True)
class PruneResult:
    """What `rtk prune` wrote (OUT/{plan.json, model/, report.md, ri_heatmap.png, ppl_curve.png}) and its numbers."""

    out: Path
    model_dir: Path  # OUT/model: the pruned (and, with heal:, healed) model, exported and verified
    plan_file: Path
    report: Path
    plan: dict  # plan.json (schema: rtk.plan.Plan)
    removed: list  # the removed sublayers, in the order the search removed them ("attn.5", "mlp.12", ...)
    params_total: int
    params_removed: int
    params_removed_fraction: float
    ppl_before: float  # the recipe's evaluation text (data.evaluation), the dense model
    ppl_after: float  # the same blocks, the pruned model (before healing)
    heal: Optional[dict] = None  # plan["heal"] when the recipe heals

    @classmethod
    def of(cls, out: Path, plan: dict) -> "PruneResult":
        ev = plan["eval"]
        return cls(out=out, model_dir=out / "model", plan_file=out / PLAN_FILE, report=out / "report.md", plan=plan,
                   removed=[e["name"] for e in plan["removed"]], params_total=plan["params_total"],
                   params_removed=plan["params_removed"], params_removed_fraction=plan["params_removed_fraction"],
                   ppl_before=ev["ppl_base"], ppl_after=ev["ppl_final"], heal=plan.get("heal"))


def default_out(recipe: Union[str, Path]) -> Path:
    """Where `rtk prune RECIPE` writes without -o."""
    return Path("runs") / Path(recipe).stem


def prune(recipe: Union[str, Path, Mapping, Recipe], out: Union[str, Path, None] = None, *,
          max_steps: Optional[int] = None, progress: bool = True,
          echo: Optional[Callable[[str], None]] = print, heal: bool = True) -> PruneResult:
    """Score, search, rewrite and export as `rtk prune RECIPE -o OUT`. `recipe`: a YAML file, or the recipe's
    keys as a mapping (then `out` is needed). `echo`: where the progress lines go (None: nowhere). `heal=False`
    (--no-heal) leaves the recipe's heal: section for `rtk heal` on N processes."""
    from rtk.prune.run import run_prune

    if isinstance(recipe, Recipe):
        rec = recipe
    elif isinstance(recipe, Mapping):
        rec = parse_recipe(dict(recipe), where="recipe")
    else:
        rec = load_recipe(recipe)
    if not heal:
        rec = rec.model_copy(update={"heal": None})
    if out is None:
        if isinstance(recipe, (Mapping, Recipe)):
            raise RtkError("out: a recipe given as a mapping needs an output folder (out=...)")
        out = default_out(recipe)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise RtkError(f"--max-steps: expected a positive integer, got {max_steps!r}")
    out = Path(out)
    plan = run_prune(rec, out, progress=progress, echo=echo or (lambda s: None), max_steps=max_steps)
    return PruneResult.of(out, plan)
