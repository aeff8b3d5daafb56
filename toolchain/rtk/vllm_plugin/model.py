"""RtkForCausalLM: a heterogeneous Llama / Qwen3 / Gemma 3 decoder built from vLLM's own layers.

Every layer's attention and MLP sublayer is present or absent, as the folder's config says: a standard
Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 config whose `per_layer_config` lists the removed modules
(`{"3": {"skip": ["attention"]}}`), or rtk's nemotron-nas config (`block_configs`); both are read by
`rtk.model.modeling_rtk` (`config_from_standard`), the class transformers loads from the same folder.

- Which vLLM modules a layer is built from is its family's entry (rtk.model.arch.FAMILIES, `vllm`): by
  default vLLM's `LlamaAttention` (fused q/k/v, RoPE, paged KV cache), `LlamaMLP` and `RMSNorm`; Qwen3 (q and
  k normalized per head) takes `Qwen3Attention`; Gemma 3 layers are vLLM's own Gemma 3 modules:
  `Gemma3Attention` (q/k norms, query_pre_attn_scalar, the layer's RoPE and, on sliding layers, its window),
  `Gemma3MLP` (GELU-tanh) and `GemmaRMSNorm` before and after each sublayer (the after-norm applied to the
  branch, inside the sublayer); embeddings scaled by sqrt(hidden) and logits softcapped as vLLM's
  Gemma3ForCausalLM does.
  All of them split over tensor-parallel ranks, so any TP size that divides the heads works.
- Only present attention sublayers create an `Attention` module, and vLLM sizes the KV cache from those
  modules: a removed attention holds no cache (and a sliding one only its window).
- The residual stream follows vLLM's fused add + RMSNorm convention (`norm(x, residual)`), started by
  whichever sublayer comes first, so a model whose first sublayer is an MLP (layer 0's attention removed)
  runs; stock vLLM's DeciLM assumes attention comes first and crashes there.
"""
from collections.abc import Iterable
from itertools import islice
from types import SimpleNamespace

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gemma3 import Gemma3Attention, Gemma3MLP
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaAttention, LlamaMLP, LlamaModel
from vllm.model_executor.models.qwen3 import Qwen3Attention
from vllm.model_executor.models.utils import (AutoWeightsLoader, PPMissingLayer,
                                              make_empty_intermediate_tensors_factory, make_layers, maybe_prefix)
from vllm.sequence import IntermediateTensors

from rtk.model.arch import family_of
from rtk.model.modeling_rtk import SUBLAYER_MODULES, RtkDeciConfig, attention_type, config_from_standard, window_of
from rtk.model.sublayer import RemovedSet, removed_set


def rtk_config(hf_config) -> RtkDeciConfig:
    """The per-layer plan of the folder's config (standard + per_layer_config, or nemotron-nas)."""
    if getattr(hf_config, "model_type", None) == RtkDeciConfig.model_type:
        return hf_config
    return config_from_standard(hf_config)


def gemma_view(rtk: RtkDeciConfig) -> SimpleNamespace:
    """What vLLM's Gemma3Attention reads from a Gemma3TextConfig, from the rtk config (every layer's type, even
    where its attention is gone, so that layer indices stay those of the checkpoint)."""
    return SimpleNamespace(query_pre_attn_scalar=rtk.query_pre_attn_scalar, attention_bias=bool(rtk.attention_bias),
                           rms_norm_eps=rtk.rms_norm_eps, sliding_window=window_of(rtk),
                           layer_types=[attention_type(b) for b in rtk.block_configs],
                           rope_parameters=rtk.rope_parameters, is_causal=True)


def _sublayer(norm, fn, hidden, residual):
    """x += fn(norm(x)) in vLLM's residual convention: the stream is hidden + residual (hidden alone while
    residual is None); returns fn's output as the new hidden and the stream so far as the residual."""
    if residual is None:
        residual, hidden = hidden, norm(hidden)
    else:
        hidden, residual = norm(hidden, residual)
    return fn(hidden), residual


def _llama_attention(rtk: RtkDeciConfig, kv: int, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    return LlamaAttention(
        config=vllm_config.model_config.hf_config, hidden_size=rtk.hidden_size, num_heads=rtk.num_attention_heads,
        num_kv_heads=kv, max_position_embeddings=rtk.max_position_embeddings, quant_config=vllm_config.quant_config,
        bias=bool(rtk.qkv_bias), bias_o_proj=bool(rtk.attention_bias), cache_config=vllm_config.cache_config,
        prefix=prefix)


def _qwen3_attention(rtk: RtkDeciConfig, kv: int, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    if rtk.attention_bias:
        raise ValueError("rtk plugin: q/k norms with an o_proj bias are not supported")
    return Qwen3Attention(
        hidden_size=rtk.hidden_size, num_heads=rtk.num_attention_heads, num_kv_heads=kv,
        rope_parameters=vllm_config.model_config.hf_config.rope_parameters, max_position=rtk.max_position_embeddings,
        head_dim=rtk.head_dim, rms_norm_eps=rtk.rms_norm_eps, qkv_bias=bool(rtk.qkv_bias),
        cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=prefix)


def _gemma3_attention(rtk: RtkDeciConfig, kv: int, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    return Gemma3Attention(
        config=gemma_view(rtk), hidden_size=rtk.hidden_size, num_heads=rtk.num_attention_heads, num_kv_heads=kv,
        head_dim=rtk.head_dim, max_position_embeddings=rtk.max_position_embeddings,
        cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=prefix)


def _llama_mlp(rtk: RtkDeciConfig, width: int, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    return LlamaMLP(hidden_size=rtk.hidden_size, intermediate_size=width, hidden_act=rtk.hidden_act,
                    quant_config=vllm_config.quant_config, bias=bool(rtk.mlp_bias), prefix=prefix)


def _gemma3_mlp(rtk: RtkDeciConfig, width: int, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    return Gemma3MLP(hidden_size=rtk.hidden_size, intermediate_size=width, hidden_activation=rtk.hidden_act,
                     quant_config=vllm_config.quant_config, prefix=prefix)


# The vLLM modules a family's entry may name (rtk.model.arch.Vllm), each built from the rtk config
ATTENTIONS = {"LlamaAttention": _llama_attention, "Qwen3Attention": _qwen3_attention,
              "Gemma3Attention": _gemma3_attention}
MLPS = {"LlamaMLP": _llama_mlp, "Gemma3MLP": _gemma3_mlp}
NORMS = {"RMSNorm": RMSNorm, "GemmaRMSNorm": GemmaRMSNorm}


class RtkDecoderLayer(nn.Module):
    """A layer's present sublayers, each h += post(branch(pre(h))) (post only with sandwich norms), named as in
    the checkpoint (modeling_rtk.SUBLAYER_MODULES), built from the vLLM modules its family's entry names."""

    def __init__(self, vllm_config: VllmConfig, rtk: RtkDeciConfig, removed: RemovedSet, layer_idx: int,
                 prefix: str = ""):
        super().__init__()
        block, modules = rtk.block_configs[layer_idx], family_of(rtk).vllm
        self.names = SUBLAYER_MODULES[bool(getattr(rtk, "sandwich_norms", False))]
        for kind in ("attn", "mlp"):
            for name in self.names[kind]:
                if name is not None:
                    setattr(self, name, None)
        norm = NORMS[modules.norm]
        if not removed.lacks("attn", layer_idx):
            kv = rtk.num_attention_heads // block.attention.n_heads_in_group
            self.self_attn = ATTENTIONS[modules.attention](rtk, kv, vllm_config, f"{prefix}.self_attn")
            self._norms("attn", norm, rtk.hidden_size, rtk.rms_norm_eps)
        if not removed.lacks("mlp", layer_idx):
            self.mlp = MLPS[modules.mlp](rtk, block.ffn.intermediate_size, vllm_config, f"{prefix}.mlp")
            self._norms("mlp", norm, rtk.hidden_size, rtk.rms_norm_eps)

    def _norms(self, kind: str, norm, h: int, eps: float) -> None:
        for name in self.names[kind][1:]:
            if name is not None:
                setattr(self, name, norm(h, eps=eps))

    def _run(self, kind: str, fn, hidden_states, residual):
        _, pre, post = self.names[kind]
        branch = fn if post is None else (lambda x: getattr(self, post)(fn(x)))
        return _sublayer(getattr(self, pre), branch, hidden_states, residual)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if self.self_attn is not None:
            hidden_states, residual = self._run(
                "attn", lambda x: self.self_attn(positions=positions, hidden_states=x), hidden_states, residual)
        if self.mlp is not None:
            hidden_states, residual = self._run("mlp", self.mlp, hidden_states, residual)
        return hidden_states, residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class RtkModel(nn.Module):
    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper  # q/k/v -> qkv_proj, gate/up -> gate_up_proj

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.rtk = rtk = rtk_config(self.config)
        removed = removed_set(rtk)
        self.vocab_size = rtk.vocab_size
        pp = get_pp_group()
        if pp.is_first_rank or (rtk.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(rtk.vocab_size, rtk.hidden_size,
                                                       quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            rtk.num_hidden_layers,
            lambda prefix: RtkDecoderLayer(vllm_config, rtk, removed, int(prefix.rsplit(".", 1)[1]), prefix=prefix),
            prefix=f"{prefix}.layers")
        norm = NORMS[family_of(rtk).vllm.norm]
        self.norm = norm(rtk.hidden_size, eps=rtk.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        # Gemma: embeddings x sqrt(hidden) in the model's dtype, as vLLM's (and transformers') Gemma 3
        self.register_buffer("normalizer", torch.tensor(rtk.hidden_size ** 0.5)
                             if getattr(rtk, "scale_embeddings", False) else None, persistent=False)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], rtk.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.embed_tokens(input_ids)
        return out if self.normalizer is None else out * self.normalizer

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None):
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:  # a stage whose layers are all absent has not started the residual
            return IntermediateTensors({"hidden_states": hidden_states,
                                        "residual": torch.zeros_like(hidden_states) if residual is None else residual})
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class RtkForCausalLM(nn.Module, SupportsPP):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.model = RtkModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        rtk = self.model.rtk
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(rtk.vocab_size, rtk.hidden_size, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if rtk.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(rtk.vocab_size,
                                                    soft_cap=getattr(rtk, "final_logit_softcapping", None))
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)  # a tied lm_head is the embedding (as Llama)
