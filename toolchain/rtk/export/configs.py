"""An rtk config as each layout writes it, and which layout a model gets.

rtk's model class reads one config (DeciLM / nemotron-nas `block_configs`). The standard and per_layer_config
layouts write the base architecture's own config instead (Llama, Qwen2, Gemma 3, ...: BASE_ARCHS in
modeling_rtk); a model fits one only when the round trip rtk config -> standard config -> rtk config keeps its
biases, norms, sizes and (Gemma 3) its settings and sliding windows. `choose_layout` is the policy: standard,
else native (stock vLLM's DeciLM), else plugin; what DeciLM lacks for a family is its entry's `decilm_lacks`
(rtk.model.arch.FAMILIES).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from rtk.errors import RtkError
from rtk.export.layouts import LAYOUTS, PER_LAYER, VLLM_VERSION
from rtk.model.arch import family_of
from rtk.model.modeling_rtk import BASE_ARCHS, RtkDeciConfig, config_from_standard
from rtk.model.sublayer import removed_set


def standard_config(config: RtkDeciConfig, base: str, layers: list[int], dtype: torch.dtype,
                    per_layer_config: Optional[dict] = None):
    """The transformers config of architecture `base` with rtk config `config`'s dimensions and its `layers`
    (indices into config's layers, in order: the standard layout keeps those whose sublayers remain)."""
    from transformers import AutoConfig

    c, spec = config, BASE_ARCHS[base]
    kw = {} if per_layer_config is None else {"per_layer_config": per_layer_config}
    std = spec.standard(c)
    if "layer_types" in std:  # Gemma 3: the type of each layer kept
        std["layer_types"] = [std["layer_types"][i] for i in layers]
    cfg = AutoConfig.for_model(
        base, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=len(layers), num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, **{spec.act_key: c.hidden_act},
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=copy.deepcopy(dict(c.rope_parameters)), tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        **spec.fixed, **std, **kw)
    cfg.architectures = [spec.hf_class]
    cfg.dtype = dtype
    return cfg


def _base_fits(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type whose standard config expresses `config`'s biases and norms, else None
    (checked by the round trip rtk config -> standard config -> rtk config)."""
    base = getattr(config, "rtk_base_model_type", None)
    if base not in BASE_ARCHS:
        return None
    back = config_from_standard(standard_config(config, base, list(range(config.num_hidden_layers)), torch.float32))
    flags = ("qkv_bias", "attention_bias", "mlp_bias", "qk_norm", "sandwich_norms", "rms_norm_unit_offset",
             "scale_embeddings")
    same = all(bool(getattr(back, k)) == bool(getattr(config, k, False)) for k in flags)
    values = ("head_dim", "num_key_value_heads", "hidden_act", "query_pre_attn_scalar", "final_logit_softcapping")
    same = same and all(getattr(back, k, None) == getattr(config, k, None) for k in values)
    windows = [[b["attention"].get("window_length") for b in c.block_configs] for c in (back, config)]
    return base if same and windows[0] == windows[1] else None


def _uniform_sizes(config: RtkDeciConfig) -> bool:
    """Every present sublayer has the global KV-head count and MLP width (rtk only removes sublayers)."""
    group = config.num_attention_heads // config.num_key_value_heads
    return all((b.attention.no_op or b.attention.n_heads_in_group == group)
               and (b.ffn.no_op or b.ffn.intermediate_size == config.intermediate_size) for b in config.block_configs)


def standard_base(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type when the model is expressible as a standard checkpoint, else None."""
    base = _base_fits(config)
    if base is None or not _uniform_sizes(config):
        return None
    if not removed_set(config).whole_layers_only():
        return None
    return base


def per_layer_base(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type when the model is expressible as a standard config + per_layer_config skips."""
    base = _base_fits(config)
    return base if base is not None and _uniform_sizes(config) else None


def vllm_blocker(config: RtkDeciConfig) -> Optional[str]:
    """The sublayer that stops stock vLLM serving a DeciLM folder (an MLP before any attention), or None."""
    blocker = removed_set(config).first_blocker(config.num_hidden_layers)
    return None if blocker is None else blocker.name


def choose_layout(config: RtkDeciConfig, requested: Optional[str] = None) -> str:
    """standard, else native (stock vLLM's DeciLM), else plugin (rtk's vLLM plugin); `requested`
    ('per-layer-config', or 'plugin') forces that layout. A model no layout serves is an RtkError saying what
    each serves."""
    base = getattr(config, "rtk_base_model_type", None) or "none"
    if requested in PER_LAYER:
        if per_layer_base(config) is None:
            raise RtkError(f"--format {requested}: the model (base model_type '{base}') is not expressible as a "
                           f"standard {', '.join(BASE_ARCHS)} config with per_layer_config skips")
        return requested
    if standard_base(config):
        return "standard"
    why = family_of(config).decilm_lacks or (
        f"its first remaining sublayer is {vllm_blocker(config)} (an MLP before any attention), and vLLM's "
        "DeciLM layer crashes there" if vllm_blocker(config) else None)
    if why is None:
        return "native"
    if per_layer_base(config):
        return "plugin"
    raise RtkError(f"plan: no vLLM format serves this model: stock vLLM {VLLM_VERSION}'s DeciLM cannot ({why}), and "
                   f"rtk's vLLM plugin serves standard {', '.join(BASE_ARCHS)} configs whose removed modules "
                   f"are listed per layer, which this model (base model_type '{base}') is not")


def architecture_of(config: RtkDeciConfig, layout: str) -> str:
    """The architectures[] entry of `config` written in `layout`: the layout's own, or the base class."""
    base = standard_base(config) if layout == "standard" else per_layer_base(config)
    return LAYOUTS[layout].architecture or BASE_ARCHS[base].hf_class
