"""Resumable healing: what a checkpoint holds (the loss history, the RNG state) and the files it lives in."""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Optional

import torch

CHECKPOINT = "checkpoint.pt"
STATE = "heal_state.json"


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
