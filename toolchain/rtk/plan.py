"""plan.json: what a pruning removed, from which model, and how it was measured. Its schema lives here, and
every plan.json rtk writes or reads goes through `write_plan` / `read_plan`, which check it.

`rtk prune` writes the whole record (search steps, scores, PPLs, scoring engine); `rtk heal` adds `heal`;
`rtk ablate` writes one per exported variant; every export copies it beside the weights. Fields a stage does
not know stay as they are (extra keys are kept), so older plans still read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from rtk.errors import RtkError
from rtk.model.sublayer import RemovedSet
from rtk.outdir import replace_atomic

PLAN_FILE = "plan.json"


class RemovedEntry(BaseModel):
    """One removal of a search, in the order it was made."""

    model_config = ConfigDict(extra="allow")
    name: str
    layer: int
    kind: str
    params: int
    ri: Optional[float] = None
    nri: Optional[float] = None
    ppl_after: Optional[float] = None


class Plan(BaseModel):
    model_config = ConfigDict(extra="allow")

    removed_sublayers: list[str]  # every removed sublayer (attn.N / mlp.N; layer.N for both), in model order
    model: Optional[str] = None  # the original model as the user named it (spec, hub id, folder)
    model_path: Optional[str] = None  # where it was loaded from on the machine that pruned
    rtk_version: Optional[str] = None
    recipe: Optional[dict] = None
    recipe_fingerprint: Optional[str] = None
    params_total: Optional[int] = None
    params_after: Optional[int] = None
    params_removed: Optional[int] = None
    params_removed_fraction: Optional[float] = None
    params_counted: Optional[dict] = None  # what the target counted: {count: all | non_embedding, total,
    #                                        removed_fraction}
    ppl_base: Optional[float] = None  # calibration PPL before and after (the search's own numbers)
    ppl_final: Optional[float] = None
    calibration: Optional[dict] = None
    eval: Optional[dict] = None  # evaluation text and PPL before / after
    removed: Optional[list[RemovedEntry]] = None  # the search's removals with their scores
    steps: Optional[list[dict]] = None
    scoring: Optional[dict] = None
    speed: Optional[dict] = None  # predicted serving speedup: how (profile / roofline), target, prediction
    wall_seconds: Optional[float] = None
    variant: Optional[str] = None  # rtk ablate: the variant and target that made it
    selection: Optional[dict] = None  # recipe select:: every plan proposed, the finalists healed and judged, why
    #                                   the output won
    heal: Optional[dict] = None  # rtk heal: data, settings, loss history, PPL before / after, export
    heal_fingerprint: Optional[str] = None

    @field_validator("removed_sublayers")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        """Names the removed-set codec reads (kept as written: plan.json's text does not change)."""
        try:
            RemovedSet.of(names, "removed_sublayers")
        except RtkError as exc:
            raise ValueError(exc.message) from None
        return names


def _errors(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e["loc"]) or "(top level)"
    if e["loc"][:1] == ("removed_sublayers",) and e["type"] != "value_error":
        return "has no 'removed_sublayers' list (write it with rtk prune)"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if e["loc"] == ("removed_sublayers",) and e["type"] == "value_error" else f"{where}: {msg}"


def check_plan(data, where: str) -> dict:
    """`data` if it is a plan.json rtk can use; else one line naming `where` and the field."""
    if not isinstance(data, dict):
        raise RtkError(f"{where}: not a plan written by rtk (a JSON object)")
    try:
        Plan.model_validate(data)
    except ValidationError as exc:
        raise RtkError(f"{where}: {_errors(exc)}") from None
    return data


def read_plan(path: Path, where: Optional[str] = None) -> dict:
    """A plan.json, checked against the schema (`where` starts each error; default the path)."""
    where = where or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RtkError(f"{where}: cannot read it as JSON ({exc})") from None
    return check_plan(data, where)


def plan_text(plan: dict) -> str:
    return json.dumps(check_plan(plan, "plan"), indent=2)


def write_plan(path: Path, plan: dict) -> None:
    """Check `plan` against the schema, then write it atomically (the file is whole or absent)."""
    text = plan_text(plan)
    replace_atomic(Path(path), lambda p: p.write_text(text))

