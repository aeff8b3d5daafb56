"""Physical rewrite: a new model whose config says which sublayers exist and whose state dict
holds only their weights."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from rtk.errors import RtkError
from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM, RtkModel
from rtk.model.sublayer import RemovedSet, owner_prefixes

MODELING_FILE = Path(__file__).with_name("modeling_rtk.py")  # copied beside the weights of some layouts


def pruned_config(config: RtkDeciConfig, removed: Iterable[str]) -> RtkDeciConfig:
    """`config` with the sublayers named in `removed` marked absent as well."""
    blocks = RemovedSet.of(removed).mark_blocks(config.block_configs)
    return RtkDeciConfig(**{**config.to_dict(), "block_configs": blocks})


def apply_plan(model: RtkDeciLMForCausalLM, removed: Iterable[str]) -> RtkDeciLMForCausalLM:
    """A new, smaller model without the removed sublayers (weights shared with the original)."""
    removed = RemovedSet.of(removed)
    cfg = pruned_config(model.config, removed)
    drop = tuple(p for n in removed for p in owner_prefixes(n, cfg))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
    with torch.device("meta"):
        new = RtkDeciLMForCausalLM(cfg)
    missing, unexpected = new.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RtkError(f"plan does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        new.tie_weights()
    new.model.inv_freq = RtkModel._rope(cfg)[0].to(model.model.inv_freq.device)
    return new.eval()

