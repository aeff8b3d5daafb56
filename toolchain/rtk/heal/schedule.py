"""What the healing loop reads when: the learning-rate schedule, the order of the training blocks, and how
many optimizer steps a token budget buys."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # annotations only: the loop runs without pydantic (bench/scale/gpu_heal.py on a bare GPU machine)
    from rtk.heal.config import HealConfig


def lr_factor(step: int, steps: int, warmup: float, min_lr: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `steps`: linear warm-up
    over the first `warmup` fraction, then cosine from 1 down to `min_lr`."""
    n_warm = int(round(warmup * steps))
    if step < n_warm:
        return (step + 1) / (n_warm + 1)
    span = max(1, steps - n_warm - 1)
    progress = min(1.0, (step - n_warm) / span)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class DataOrder:
    """Which block each training sample is: sample i is block perm_e[i % n] of pass e = i // n over the
    pool, each pass a permutation seeded by (seed, e). A pure function of i: a resumed run reads on
    exactly where the stopped one would have."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + count)]


class Pool:
    """The in-memory blocks [n, seq_len] in DataOrder's seeded order."""

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.order = blocks, DataOrder(blocks.shape[0], seed)
        self.n_blocks, self.seq_len = blocks.shape

    def batch(self, start: int, count: int) -> torch.Tensor:
        return self.blocks[self.order.indices(start, count)]

    def state(self) -> Optional[dict]:
        return None

    def restore(self, state: Optional[dict]) -> None:
        pass


def plan_steps(cfg: HealConfig, seq_len: int) -> tuple[int, int]:
    """(optimizer steps, tokens per step) for the budget."""
    per_step = cfg.micro_batch * cfg.grad_accum * seq_len
    return max(1, math.ceil(cfg.tokens / per_step)), per_step
