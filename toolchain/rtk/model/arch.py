"""Per-architecture knowledge, as a table: which configs rtk reads and how they map to its model.

Every supported architecture is a pre-norm decoder whose layers are
``x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`` with the Llama weight
names, so one model class (``modeling_rtk``) runs them all and one state dict layout serves all.
The table itself (``BASE_ARCHS``: biases, Qwen3's q/k norms) lives in ``modeling_rtk``, because that
file, copied beside exported weights, reads standard configs on its own.
"""
from __future__ import annotations

from rtk.errors import RtkError
from rtk.model.modeling_rtk import BASE_ARCHS, RtkDeciConfig, config_from_standard

ARCHS = BASE_ARCHS
NATIVE = "nemotron-nas"
SUPPORTED = ", ".join(sorted(ARCHS)) + f", {NATIVE} (rtk-pruned)"


def check_supported(hf_config, where: str) -> str:
    mt = getattr(hf_config, "model_type", None)
    if mt == NATIVE or mt in ARCHS:
        if mt != NATIVE and getattr(hf_config, "hidden_act", "silu") not in ("silu", "swish"):
            raise RtkError(f"{where}: hidden_act '{hf_config.hidden_act}' is not supported (rtk supports silu)")
        if mt == "mistral" and getattr(hf_config, "sliding_window", None) not in (None,) and (
            hf_config.sliding_window < hf_config.max_position_embeddings
        ):
            raise RtkError(f"{where}: Mistral with sliding_window={hf_config.sliding_window} is not supported")
        if mt in ("qwen2", "qwen3") and getattr(hf_config, "use_sliding_window", False):
            raise RtkError(f"{where}: {mt} with use_sliding_window=true is not supported")
        if mt == "qwen3" and getattr(hf_config, "attention_bias", False):
            raise RtkError(f"{where}: Qwen3 with attention_bias=true is not supported (vLLM's Qwen3 attention "
                           "has no o_proj bias)")
        return mt
    raise RtkError(f"{where}: architecture '{mt}' is not supported; rtk supports: {SUPPORTED}")


def rtk_config_from_hf(hf_config) -> RtkDeciConfig:
    """The rtk config equivalent to a standard Llama-family config (its per_layer_config `skip` lists,
    if any, become absent sublayers); rtk's own nemotron-nas configs pass through."""
    mt = check_supported(hf_config, "model")
    if mt == NATIVE:
        return hf_config
    try:
        return config_from_standard(hf_config)
    except ValueError as exc:
        raise RtkError(f"model: config.json: {exc}") from None
