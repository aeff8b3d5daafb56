"""Per-architecture knowledge, as a table: which configs rtk reads and how they map to its model.

Every supported architecture is a pre-norm decoder whose layers are
``x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`` with the Llama weight
names, so one model class (``modeling_rtk``) runs them all and one state dict layout serves all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import RtkError
from .modeling_rtk import RtkDeciConfig, make_block


@dataclass(frozen=True)
class ArchSpec:
    name: str
    hf_class: str  # the architectures[] entry of a standard checkpoint
    qkv_bias: Callable[[object], bool]
    attention_bias: Callable[[object], bool]


ARCHS: dict[str, ArchSpec] = {
    # Llama's attention_bias puts a bias on q, k, v *and* o; the DeciLM config (and vLLM) say so with
    # qkv_bias (q/k/v) + attention_bias (o).
    "llama": ArchSpec("llama", "LlamaForCausalLM",
                      qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
                      attention_bias=lambda c: bool(getattr(c, "attention_bias", False))),
    "mistral": ArchSpec("mistral", "MistralForCausalLM",
                        qkv_bias=lambda c: False, attention_bias=lambda c: False),
    "qwen2": ArchSpec("qwen2", "Qwen2ForCausalLM",
                      qkv_bias=lambda c: True, attention_bias=lambda c: False),
}
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
        return mt
    raise RtkError(f"{where}: architecture '{mt}' is not supported; rtk supports: {SUPPORTED}")


def rtk_config_from_hf(hf_config) -> RtkDeciConfig:
    """The dense rtk config equivalent to a standard Llama-family config."""
    mt = check_supported(hf_config, "model")
    if mt == NATIVE:
        return hf_config
    spec = ARCHS[mt]
    c = hf_config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default",
                                                    "rope_theta": getattr(c, "rope_theta", 10000.0)}
    return RtkDeciConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        intermediate_size=c.intermediate_size, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(rope), attention_bias=spec.attention_bias(c), qkv_bias=spec.qkv_bias(c),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        block_configs=[make_block(heads // kv, c.intermediate_size) for _ in range(c.num_hidden_layers)],
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
        pad_token_id=getattr(c, "pad_token_id", None),
        architectures=["DeciLMForCausalLM"],
        rtk_base_model_type=mt,
    )
