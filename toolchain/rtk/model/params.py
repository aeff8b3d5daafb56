"""Parameter counts of modules and models in memory. (A config's count on paper, from its shapes, is
`rtk.model.cost.model_params`, beside the per-sublayer shapes it sums; tests hold the two equal.)"""
from __future__ import annotations

from typing import Iterable


def param_count(module) -> int:
    """Parameters of a module (0 for an absent one)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def unique_params(params: Iterable) -> list:
    """Parameters without repeats (a tied embedding / LM head is one tensor)."""
    return list({id(p): p for p in params}.values())


def total_params(model) -> int:
    """All parameters, a tied embedding/head counted once."""
    return sum(p.numel() for p in unique_params(model.parameters()))


def embedding_params(model) -> int:
    """Parameters of the token embedding and the LM head (rtk's class; a tied matrix counted once): what a
    non-embedding count leaves out, and what pruning never removes."""
    return sum(p.numel() for p in unique_params([*model.model.embed_tokens.parameters(), *model.lm_head.parameters()]))


def counted_params(model, count: str) -> int:
    """The parameters a params_removed target counts (recipe search.target.count): all, or non_embedding."""
    if count not in ("all", "non_embedding"):
        raise ValueError(count)
    return total_params(model) - (embedding_params(model) if count == "non_embedding" else 0)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in unique_params(model.parameters()))

