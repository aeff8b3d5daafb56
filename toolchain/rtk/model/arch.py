"""The family table: everything rtk knows about each architecture it reads, one entry per family.

Every supported architecture is a decoder whose layers are ``x += attn(norm(x)); x += mlp(norm(x))`` with
the Llama weight names (Gemma 3 adds a norm after each branch, under its own names), so one model class
(``modeling_rtk``) runs them all and one state dict layout serves each. An entry of ``FAMILIES`` holds:

- ``base``: the modeling row (``modeling_rtk.BASE_ARCHS``: biases, q/k norms, Gemma's settings, the standard
  config's keys). It lives in ``modeling_rtk`` because that file, copied beside exported weights, reads
  standard configs on its own; the shapes the cost model reads (``model/cost.py``: q/k norms, norms after each
  branch, biases) are the rtk config's flags this row sets.
- ``activations`` and ``checks``: the config checks, each variant rtk's class (or its vLLM plugin) does not run
  refused in one line; ``neighbours``: related model types rtk refuses, with the hint its message gives;
- ``decilm_lacks``: why stock vLLM's DeciLM cannot serve a partly pruned model of the family, which sends it
  to rtk's vLLM plugin (export/configs.choose_layout); None: the native DeciLM layout serves it;
- ``vllm``: the vLLM modules rtk's plugin builds its layers from (vllm_plugin/model.py);
- ``needs_bos``: the family's models expect BOS before every sequence, so its tokenizer must add it (the name
  the refusal gives the family; None: no such need);
- ``tiny``: the tiny random model the tests make of it (tests/conftest.tiny_hf).

DeciLM / Nemotron-NAS is rtk's own format, not a family: its names (``NATIVE``, ``DECILM_ARCH``) come from
``modeling_rtk``, and a nemotron-nas config rtk did not make (no ``rtk_base_model_type``) is read as ``DECILM``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from rtk.errors import RtkError
from rtk.model.modeling_rtk import (ATTENTION_TYPES, BASE_ARCHS, DECILM_ARCHITECTURE, BaseArch, RtkDeciConfig,
                                    config_from_standard)

NATIVE = RtkDeciConfig.model_type  # "nemotron-nas": the model_type of rtk's DeciLM folders
DECILM_ARCH = DECILM_ARCHITECTURE  # "DeciLMForCausalLM": what stock vLLM dispatches nemotron-nas folders on
LLAMA_ACTS = ("silu", "swish")
GEMMA_ACT = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class Vllm:
    """The vLLM classes (vllm.model_executor.layers / .models) the plugin builds a family's layers from."""
    attention: str = "LlamaAttention"
    mlp: str = "LlamaMLP"
    norm: str = "RMSNorm"


@dataclass(frozen=True)
class Tiny:
    """The tiny random model tests make of a family (tests/conftest.tiny_hf: the config transformers makes for the
    model_type, the class base.hf_class): the config keys beyond the shared tiny sizes, and the parameters redrawn
    from N(mean, 0.5) after init so that the family's own weights (biases, q/k norms, Gemma's 1 + w norms) move
    the logits."""
    config: dict = field(default_factory=dict)
    layer_types: tuple[str, ...] = ()  # repeated over the layers (Gemma 3's sliding and global layers)
    redraw: tuple[str, ...] = ()  # parameter name suffixes
    mean: float = 0.0


@dataclass(frozen=True)
class Family:
    base: Optional[BaseArch]  # modeling_rtk's row; None for DECILM (a nemotron-nas config rtk did not make)
    activations: tuple[str, ...] = LLAMA_ACTS  # the MLP activations rtk runs (base.act_key names the config key)
    checks: tuple[Callable[[object, str], None], ...] = ()  # (config, where) -> RtkError for what rtk cannot run
    decilm_lacks: Optional[str] = None
    vllm: Vllm = Vllm()
    needs_bos: Optional[str] = None
    neighbours: dict = field(default_factory=dict)  # model_type rtk refuses -> the hint its message gives
    tiny: Optional[Tiny] = None

    def check(self, model_type: str, config, where: str) -> None:
        """One line for the first thing in `config` rtk's class (or its vLLM plugin) does not run."""
        if self.base is not None:
            act = getattr(config, self.base.act_key, "silu")
            if act not in self.activations:
                raise RtkError(f"{where}: {self.base.act_key} '{act}' is not supported (rtk supports "
                               f"{self.activations[0]} for {model_type})")
        for check in self.checks:
            check(config, where)


def _no_mistral_window(c, where: str) -> None:
    if getattr(c, "sliding_window", None) not in (None,) and c.sliding_window < c.max_position_embeddings:
        raise RtkError(f"{where}: Mistral with sliding_window={c.sliding_window} is not supported")


def _no_qwen_window(c, where: str) -> None:
    if getattr(c, "use_sliding_window", False):
        raise RtkError(f"{where}: {c.model_type} with use_sliding_window=true is not supported")


def _no_qwen3_o_bias(c, where: str) -> None:
    if getattr(c, "attention_bias", False):
        raise RtkError(f"{where}: Qwen3 with attention_bias=true is not supported (vLLM's Qwen3 attention "
                       "has no o_proj bias)")


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


QWEN_BIASES = (".q_proj.bias", ".k_proj.bias", ".v_proj.bias")
FAMILIES: dict[str, Family] = {
    "llama": Family(BASE_ARCHS["llama"], tiny=Tiny()),
    "mistral": Family(BASE_ARCHS["mistral"], checks=(_no_mistral_window,),
                      tiny=Tiny({"sliding_window": None})),
    "qwen2": Family(BASE_ARCHS["qwen2"], checks=(_no_qwen_window,),
                    tiny=Tiny(redraw=QWEN_BIASES)),
    "qwen3": Family(BASE_ARCHS["qwen3"], checks=(_no_qwen_window, _no_qwen3_o_bias),
                    decilm_lacks="Qwen3's per-head q/k norms", vllm=Vllm(attention="Qwen3Attention"),
                    tiny=Tiny({"head_dim": 24, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
                              redraw=(".q_norm.weight", ".k_norm.weight"), mean=1.0)),
    "gemma3_text": Family(
        BASE_ARCHS["gemma3_text"], activations=(GEMMA_ACT,), checks=(_check_gemma,),
        decilm_lacks="Gemma 3's norms after each sublayer (sandwich norms)",
        vllm=Vllm("Gemma3Attention", "Gemma3MLP", "GemmaRMSNorm"), needs_bos="Gemma",
        neighbours={"gemma3": "Gemma 3's multimodal checkpoints: rtk reads the text-only gemma3_text ones"},
        tiny=Tiny({"head_dim": 24, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "sliding_window": 4,
                   "query_pre_attn_scalar": 32,
                   "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}},
                  layer_types=("sliding_attention", "full_attention"), redraw=("norm.weight",))),
}
DECILM = Family(None)  # a nemotron-nas config rtk did not make: Llama's layers
SUPPORTED = ", ".join(sorted(FAMILIES)) + f", {NATIVE} (rtk-pruned)"


FAMILY_FLAGS = ("qk_norm", "sandwich_norms")  # rtk config flags that Llama's layers (DECILM) cannot honour


def family_of(config) -> Family:
    """The family of an rtk config (its rtk_base_model_type), DECILM for a nemotron-nas config rtk did not make.
    Such a config that asks for what only a family's modules do (q/k norms, sandwich norms) is one line: read as
    Llama's layers, it would load and serve wrong numbers."""
    base = getattr(config, "rtk_base_model_type", None)
    if base in FAMILIES:
        return FAMILIES[base]
    asks = [flag for flag in FAMILY_FLAGS if getattr(config, flag, False)]
    if asks:
        raise RtkError(f"config: a {NATIVE} config with {' and '.join(asks)} must name its family in "
                       f"rtk_base_model_type (one of {', '.join(FAMILIES)}; got {base!r})")
    return DECILM


def check_supported(hf_config, where: str) -> str:
    """The model_type of a config rtk runs (a family's, or nemotron-nas); else one line saying what rtk reads."""
    mt = getattr(hf_config, "model_type", None)
    if mt == NATIVE:
        return mt
    if mt in FAMILIES:
        FAMILIES[mt].check(mt, hf_config, where)
        return mt
    hint = next((f" ({h})" for f in FAMILIES.values() for n, h in f.neighbours.items() if n == mt), "")
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
