"""Resumable healing: what a checkpoint holds and the files it lives in.

A checkpoint is a `torch.distributed.checkpoint` (DCP) folder: the trainable weights and the AdamW state, each
process writing its own shards, plus `meta.pt` (step, loss history, scheduler, RNG, the data stream's position).
DCP reshards on load, so a healing paused under N processes resumes under M (one process included, with no
process group). It is written beside the last one and renamed over it; `heal_state.json` names the step.
"""
from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from rtk.outdir import write_json_atomic

if TYPE_CHECKING:
    from rtk.heal.distributed import World

CHECKPOINT = "checkpoint"  # DCP folder in the state folder
STATE = "heal_state.json"
META = "meta.pt"


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # per optimizer step: tokens, loss, kl, ce, lr, grad_norm
    evals: list[dict] = field(default_factory=list)  # {step, tokens, ppl}
    train_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "train_seconds": self.train_seconds}

    @classmethod
    def from_json(cls, d: dict) -> "History":
        return cls(list(d["steps"]), list(d["evals"]), float(d["train_seconds"]))


def num_or_none(x: float) -> Optional[float]:
    """JSON has no NaN: a term that is not computed is null."""
    return None if math.isnan(x) else x


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _dcp_quiet():
    """DCP warns that it runs without a process group: in one process that is the intent."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    return ctx


def _state(model, opt, params: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"params": params, "optim": get_optimizer_state_dict(model, opt)}


def save_checkpoint(state_dir: Path, world: Optional["World"], model, opt, params: dict, meta: dict,
                    fingerprint: str, steps: int) -> None:
    """Every process writes its shards into state_dir/checkpoint.tmp; rank 0 adds meta.pt, renames it over
    state_dir/checkpoint and records the step in heal_state.json."""
    import torch.distributed.checkpoint as dcp

    from rtk.heal.distributed import barrier

    main = world is None or world.main
    tmp, final, old = state_dir / f"{CHECKPOINT}.tmp", state_dir / CHECKPOINT, state_dir / f"{CHECKPOINT}.old"
    if main:
        state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    ctx = _dcp_quiet()
    try:
        dcp.save(_state(model, opt, params), checkpoint_id=str(tmp))
    finally:
        ctx.__exit__(None, None, None)
    barrier(world)
    if main:
        torch.save(meta, tmp / META)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        write_json_atomic(state_dir / STATE, {"fingerprint": fingerprint, "step": meta["step"], "steps": steps,
                                              "processes": 1 if world is None else world.size})
    barrier(world)


def saved_checkpoint(state_dir: Optional[Path]) -> Optional[Path]:
    """The last complete checkpoint folder in state_dir (the previous one when the newest was being renamed)."""
    if state_dir is None:
        return None
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (state_dir / name / META).is_file():
            return state_dir / name
    return None


def load_meta(ckpt: Path) -> dict:
    return torch.load(ckpt / META, map_location="cpu", weights_only=False)


def load_checkpoint(ckpt: Path, model, opt, params: dict) -> None:
    """Load the weights and AdamW state of `ckpt` into this process's (sharded or whole) `params` and `opt`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = _state(model, opt, params)
    ctx = _dcp_quiet()
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    finally:
        ctx.__exit__(None, None, None)
    set_optimizer_state_dict(model, opt, state["optim"])
