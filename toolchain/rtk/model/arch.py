"""Per-architecture knowledge, as a table: which configs rtk reads and how they map to its model.

Every supported architecture is a decoder whose layers are ``x += attn(norm(x)); x += mlp(norm(x))`` with
the Llama weight names (Gemma 3 adds a norm after each branch, under its own names), so one model class
(``modeling_rtk``) runs them all and one state dict layout serves each. The table itself (``BASE_ARCHS``:
biases, q/k norms, Gemma's settings) lives in ``modeling_rtk``, because that file, copied beside exported
weights, reads standard configs on its own; this module refuses the variants it does not run.
"""
from __future__ import annotations

from rtk.errors import RtkError
from rtk.model.modeling_rtk import ATTENTION_TYPES, BASE_ARCHS, RtkDeciConfig, config_from_standard

ARCHS = BASE_ARCHS
NATIVE = "nemotron-nas"
SUPPORTED = ", ".join(sorted(ARCHS)) + f", {NATIVE} (rtk-pruned)"
GEMMA_ACT = "gelu_pytorch_tanh"


def _check_gemma(c, where: str) -> None:
    """One line for each Gemma 3 text variant rtk's class (and its vLLM plugin) does not run."""
    if getattr(c, "attn_logit_softcapping", None) is not None:
        raise RtkError(f"{where}: Gemma 3 with attn_logit_softcapping={c.attn_logit_softcapping} is not supported")
    if getattr(c, "use_bidirectional_attention", False):
        raise RtkError(f"{where}: Gemma 3 with use_bidirectional_attention=true is not supported (rtk runs "
                       "causal decoders)")
    types = list(getattr(c, "layer_types", None) or ())
    bad = sorted(set(types) - set(ATTENTION_TYPES))
    if bad or len(types) != c.num_hidden_layers:
        raise RtkError(f"{where}: Gemma 3 layer_types must name each of the {c.num_hidden_layers} layers "
                       f"{' or '.join(ATTENTION_TYPES)}" + (f" (got {', '.join(bad)})" if bad else
                                                             f" (got {len(types)} entries)"))
    rope = getattr(c, "rope_parameters", None) or {}
    for t in ATTENTION_TYPES:
        kind = (rope.get(t) or {}).get("rope_type", "default")
        if kind not in ("default", "linear"):
            raise RtkError(f"{where}: Gemma 3 with rope_type '{kind}' for {t} is not supported (rtk runs default "
                           "and linear RoPE)")


def check_supported(hf_config, where: str) -> str:
    mt = getattr(hf_config, "model_type", None)
    if mt == NATIVE or mt in ARCHS:
        if mt != NATIVE:
            spec = ARCHS[mt]
            act = getattr(hf_config, spec.act_key, "silu")
            allowed = (GEMMA_ACT,) if spec.gemma else ("silu", "swish")
            if act not in allowed:
                raise RtkError(f"{where}: {spec.act_key} '{act}' is not supported (rtk supports {allowed[0]} "
                               f"for {mt})")
            if spec.gemma:
                _check_gemma(hf_config, where)
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
    hint = " (Gemma 3's multimodal checkpoints: rtk reads the text-only gemma3_text ones)" if mt == "gemma3" else ""
    raise RtkError(f"{where}: architecture '{mt}' is not supported{hint}; rtk supports: {SUPPORTED}")


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
