"""Physical rewrite: a new model whose config says which sublayers exist and whose state dict
holds only their weights."""
from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .errors import RtkError
from .modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM, RtkModel

_OWNERS = {"attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
MODELING_FILE = Path(__file__).with_name("modeling_rtk.py")


def expand(names: Iterable[str]) -> set[str]:
    """'layer.i' -> {'attn.i', 'mlp.i'}; sublayer names pass through."""
    out = set()
    for n in names:
        kind, _, i = n.partition(".")
        out |= {f"attn.{i}", f"mlp.{i}"} if kind == "layer" else {n}
    return out


def pruned_config(config: RtkDeciConfig, removed: Iterable[str]) -> RtkDeciConfig:
    cfg = copy.deepcopy(config)
    blocks = [json.loads(json.dumps(b)) for b in cfg.block_configs]
    for name in expand(removed):
        kind, _, i = name.partition(".")
        i = int(i)
        if i >= len(blocks):
            raise RtkError(f"plan: '{name}' names layer {i}, but the model has {len(blocks)} layers")
        part = blocks[i]["attention" if kind == "attn" else "ffn"]
        if part["no_op"]:
            raise RtkError(f"plan: '{name}' is already absent from the model")
        part["no_op"] = True
        part.pop("n_heads_in_group" if kind == "attn" else "intermediate_size", None)
        part["n_heads_in_group" if kind == "attn" else "intermediate_size"] = None
    return RtkDeciConfig(**{**cfg.to_dict(), "block_configs": blocks})


def apply_plan(model: RtkDeciLMForCausalLM, removed: Iterable[str]) -> RtkDeciLMForCausalLM:
    """A new, smaller model without the removed sublayers (weights shared with the original)."""
    removed = expand(removed)
    cfg = pruned_config(model.config, removed)
    drop = [re.compile(rf"^model\.layers\.{n.split('.')[1]}\.({'|'.join(_OWNERS[n.split('.')[0]])})\.")
            for n in removed]
    sd = {k: v for k, v in model.state_dict().items() if not any(p.match(k) for p in drop)}
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


def save_native(model: RtkDeciLMForCausalLM, tokenizer, out: Path, dtype: torch.dtype | None = None) -> None:
    """Write a DeciLM / nemotron-nas folder (weights, config with auto_map, modeling code, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    m.config.architectures = ["DeciLMForCausalLM"]
    m.config.auto_map = {"AutoConfig": "modeling_rtk.RtkDeciConfig",
                         "AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
    m.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes the class name (RtkDeciLMForCausalLM); vLLM dispatches on DeciLMForCausalLM
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["DeciLMForCausalLM"]
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copy(MODELING_FILE, out / "modeling_rtk.py")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def atomic_write_dir(final: Path):
    """A temp folder next to `final`; caller renames it into place when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
