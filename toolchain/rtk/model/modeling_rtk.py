# Copyright the rtk authors. Apache-2.0.
"""A Llama-family decoder whose layers may lack their attention or MLP sublayer.

The config is the Nemotron-NAS / DeciLM format that vLLM serves natively
(`architectures: ["DeciLMForCausalLM"]`, `model_type: "nemotron-nas"`, one `block_configs`
entry per layer), or a standard Llama / Mistral / Qwen2 / Qwen3 config whose `per_layer_config`
names the removed modules of each layer (`{"3": {"skip": ["attention"]}}`, the schema of
transformers' heterogeneous configs); `config_from_standard` turns the second into the first.
This file is self-contained (torch + transformers only): rtk writes it beside exported weights so
that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads them, and rtk
itself imports it as `rtk.model.modeling_rtk`.

Key/value caches are indexed by *attention* index (0..n_attn-1), not by layer index, so layers
without attention hold no cache at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # rope types beyond the default (llama3, linear, dynamic, yarn, ...)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
except ImportError:  # pragma: no cover
    ROPE_INIT_FUNCTIONS = {}


class _Attr(dict):
    """A dict that also answers attribute access (vLLM reads `block.attention.no_op`)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Attr(value) if isinstance(value, dict) and not isinstance(value, _Attr) else value

    def __setattr__(self, name, value):
        self[name] = value


def make_block(n_heads_in_group: Optional[int], intermediate_size: Optional[int]) -> dict:
    """One `block_configs` entry; None means the sublayer is absent (no-op)."""
    return {
        "attention": {"no_op": n_heads_in_group is None, "replace_with_linear": False,
                      "n_heads_in_group": n_heads_in_group},
        "ffn": {"no_op": intermediate_size is None, "replace_with_linear": False,
                "intermediate_size": intermediate_size},
    }


# How each standard architecture's config maps onto this model: q/k/v biases, the o_proj bias, and
# Qwen3's per-head RMSNorm of q and k (applied before RoPE). Llama's attention_bias is a bias on q, k,
# v *and* o; Qwen2 always has q/k/v biases and no o bias; Qwen3's attention_bias covers q, k, v and o.
@dataclass(frozen=True)
class BaseArch:
    hf_class: str  # the architectures[] entry of a standard checkpoint
    qkv_bias: Callable[[object], bool]
    o_bias: Callable[[object], bool]
    qk_norm: bool = False
    # standard-config keys that pin behaviour rtk relies on (no sliding window)
    fixed: dict = field(default_factory=dict)
    # the inverse: an rtk config -> the standard config's keys for its biases
    standard: Callable[[object], dict] = lambda r: {}


def _attention_bias(c) -> bool:
    return bool(getattr(c, "attention_bias", False))


BASE_ARCHS: dict[str, BaseArch] = {
    "llama": BaseArch("LlamaForCausalLM", _attention_bias, _attention_bias,
                      standard=lambda r: {"attention_bias": bool(r.attention_bias), "mlp_bias": bool(r.mlp_bias)}),
    "mistral": BaseArch("MistralForCausalLM", lambda c: False, lambda c: False, fixed={"sliding_window": None}),
    "qwen2": BaseArch("Qwen2ForCausalLM", lambda c: True, lambda c: False, fixed={"use_sliding_window": False}),
    "qwen3": BaseArch("Qwen3ForCausalLM", _attention_bias, _attention_bias, qk_norm=True,
                      fixed={"use_sliding_window": False},
                      standard=lambda r: {"attention_bias": bool(r.attention_bias)}),
}
SKIP_NAMES = {"attention": "attn", "mlp": "mlp"}  # per_layer_config skip entry -> rtk sublayer kind


class RtkDeciConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        intermediate_size: int = 688,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_parameters: Optional[dict] = None,
        rope_theta: Optional[float] = None,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        block_configs: Optional[list] = None,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", "rope_theta": rope_theta or 10000.0}
        self.rope_parameters = dict(rope_parameters)
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if block_configs is None:
            group = self.num_attention_heads // self.num_key_value_heads
            block_configs = [make_block(group, intermediate_size) for _ in range(num_hidden_layers)]
        if len(block_configs) != num_hidden_layers:
            raise ValueError(f"block_configs has {len(block_configs)} entries for {num_hidden_layers} layers")
        self.block_configs = [_Attr(b) for b in block_configs]
        kwargs.pop("rope_scaling", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out


def layer_skips(config) -> list[set]:
    """Per layer, the per_layer_config `skip` entries of a standard config (empty sets if homogeneous)."""
    n = config.num_hidden_layers
    if not getattr(config, "is_heterogeneous", False):
        return [set() for _ in range(n)]
    out = []
    for i in range(n):
        skip = set(getattr(config.per_layer_config[i], "skip", None) or ())
        unknown = skip - set(SKIP_NAMES)
        if unknown:
            raise ValueError(f"per_layer_config[{i}].skip: {sorted(unknown)} cannot be skipped "
                             f"(this model skips: {', '.join(SKIP_NAMES)})")
        out.append(skip)
    return out


def config_from_standard(c, **extra) -> RtkDeciConfig:
    """The rtk config of a standard Llama / Mistral / Qwen2 / Qwen3 config; its per_layer_config `skip`
    lists ("attention", "mlp") become absent sublayers."""
    mt = getattr(c, "model_type", None)
    if mt not in BASE_ARCHS:
        raise ValueError(f"model_type '{mt}' is not one of {', '.join(BASE_ARCHS)}")
    spec = BASE_ARCHS[mt]
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default",
                                                    "rope_theta": getattr(c, "rope_theta", 10000.0)}
    blocks = [make_block(None if "attention" in skip else heads // kv,
                         None if "mlp" in skip else c.intermediate_size) for skip in layer_skips(c)]
    return RtkDeciConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        hidden_act="silu" if c.hidden_act in ("silu", "swish") else c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(rope), attention_bias=spec.o_bias(c), qkv_bias=spec.qkv_bias(c),
        mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=spec.qk_norm, block_configs=blocks,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
        pad_token_id=getattr(c, "pad_token_id", None), architectures=["DeciLMForCausalLM"],
        rtk_base_model_type=mt, **extra,
    )


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


class RtkRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RtkAttention(nn.Module):
    def __init__(self, config: RtkDeciConfig, n_heads_in_group: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads // n_heads_in_group
        self.head_dim = config.head_dim
        h = config.hidden_size
        # as vLLM's nemotron_nas.py: q/k/v biases follow qkv_bias, the o_proj bias attention_bias
        qkv_bias = bool(config.qkv_bias)
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bool(config.attention_bias))
        self.q_norm = self.k_norm = None
        if getattr(config, "qk_norm", False):  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RtkRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RtkRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_idx: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, cache_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class RtkMLP(nn.Module):
    def __init__(self, config: RtkDeciConfig, intermediate_size: int):
        super().__init__()
        h, bias = config.hidden_size, bool(config.mlp_bias)
        self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act '{config.hidden_act}' (rtk supports silu)")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RtkDecoderLayer(nn.Module):
    """A pre-norm layer; `self_attn` / `mlp` (with their norms) are None where removed."""

    def __init__(self, config: RtkDeciConfig, layer_idx: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.layer_idx = layer_idx
        self.self_attn = self.input_layernorm = None
        self.mlp = self.post_attention_layernorm = None
        if not block.attention.no_op:
            self.input_layernorm = RtkRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = RtkAttention(config, block.attention.n_heads_in_group)
        if not block.ffn.no_op:
            self.post_attention_layernorm = RtkRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = RtkMLP(config, block.ffn.intermediate_size)

    def forward(self, h, cos, sin, mask, cache=None, cache_idx=0, skip_attn=False, skip_mlp=False):
        if self.self_attn is not None and not skip_attn:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, cache_idx)
        if self.mlp is not None and not skip_mlp:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class TensorCache:
    """Minimal key/value cache over plain tensors (used for ONNX export and tests)."""

    def __init__(self, past: Optional[list] = None):
        self.kv = list(past) if past is not None else []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if not self.kv else self.kv[0][0].shape[-2]

    def update(self, k, v, idx):
        if idx < len(self.kv):
            pk, pv = self.kv[idx]
            k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
            self.kv[idx] = (k, v)
        else:
            self.kv.append((k, v))
        return k, v


class RtkPreTrainedModel(PreTrainedModel):
    config_class = RtkDeciConfig
    base_model_prefix = "model"
    _no_split_modules = ["RtkDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RtkRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RtkModel):  # a non-persistent buffer: from_pretrained never loads it
            with torch.no_grad():
                module.inv_freq.copy_(RtkModel._rope(module.config)[0].to(module.inv_freq.device))


class RtkModel(RtkPreTrainedModel):
    def __init__(self, config: RtkDeciConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RtkDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RtkRMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq, self.attention_scaling = self._rope(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # cache slot of each layer's attention (None where removed)
        self.cache_index, n = [], 0
        for layer in self.layers:
            self.cache_index.append(n if layer.self_attn is not None else None)
            n += layer.self_attn is not None
        self.post_init()

    @staticmethod
    def _rope(config):
        rope = dict(config.rope_parameters or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)
        dim = config.head_dim
        inv_freq = 1.0 / (rope.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    def rotary(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    @staticmethod
    def build_mask(attention_mask, past_len: int, q_len: int, dtype):
        """Additive [B, 1, T, P+T] mask: causal and padding. None when neither is needed."""
        if attention_mask is None and past_len == 0:
            return None
        total = past_len + q_len
        device = attention_mask.device if attention_mask is not None else None
        q_pos = torch.arange(q_len, device=device) + past_len
        k_pos = torch.arange(total, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :total].bool()
        zero = torch.zeros((), dtype=dtype, device=device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(allowed, zero, neg)

    def prepare(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, past_len=0):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = h.shape[1]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = (torch.arange(t, device=h.device) + past_len)[None]
        cos, sin = self.rotary(position_ids, h.dtype)
        mask = self.build_mask(attention_mask, past_len, t, h.dtype)
        return h, cos, sin, mask

    def run_layers(self, h, cos, sin, mask, start=0, stop=None, skip=frozenset(), cache=None):
        """Layers [start, stop); `skip` holds names like 'attn.3' / 'mlp.7' bypassed at run time."""
        stop = len(self.layers) if stop is None else stop
        for i in range(start, stop):
            layer = self.layers[i]
            h = layer(h, cos, sin, mask, cache, self.cache_index[i],
                      skip_attn=f"attn.{i}" in skip, skip_mlp=f"mlp.{i}" in skip)
        return h

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, skip=frozenset(), **kwargs):
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        h, cos, sin, mask = self.prepare(input_ids, inputs_embeds, attention_mask, position_ids, past_len)
        h = self.run_layers(h, cos, sin, mask, skip=skip, cache=past_key_values)
        return self.norm(h)


class RtkDeciLMForCausalLM(RtkPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RtkDeciConfig):
        if getattr(config, "model_type", None) != RtkDeciConfig.model_type:  # a standard config + per_layer_config
            config = config_from_standard(config)
        super().__init__(config)
        self.model = RtkModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip=frozenset(),
                return_dict=True, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            from transformers import DynamicCache

            past_key_values = DynamicCache()
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, skip=skip)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=past_key_values if use_cache else None)


# The class name vLLM and the config's `architectures` use.
DeciLMForCausalLM = RtkDeciLMForCausalLM
