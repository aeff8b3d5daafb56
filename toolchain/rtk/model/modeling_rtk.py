# Copyright the rtk authors. Apache-2.0.
"""A Llama-family or Gemma 3 decoder whose layers may lack their attention or MLP sublayer.

The config is the Nemotron-NAS / DeciLM format that vLLM serves natively
(`architectures: ["DeciLMForCausalLM"]`, `model_type: "nemotron-nas"`, one `block_configs`
entry per layer), or a standard Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 config whose `per_layer_config`
names the removed modules of each layer (`{"3": {"skip": ["attention"]}}`, the schema of
transformers' heterogeneous configs); `config_from_standard` turns the second into the first.
This file is self-contained (torch + transformers only): rtk writes it beside exported weights so
that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads them, and rtk
itself imports it as `rtk.model.modeling_rtk`.

Key/value caches are indexed by *attention* index (0..n_attn-1), not by layer index, so layers
without attention hold no cache at all.

Gemma 3 (`gemma3_text`) differs from Llama in ways the config states: a norm after each branch as well as
before it (`sandwich_norms`; a sublayer is its pre-norm, branch and post-norm, so removing it leaves the
residual stream untouched), RMSNorm scaling by (1 + w) (`rms_norm_unit_offset`), embeddings scaled by
sqrt(hidden) (`scale_embeddings`), a GELU-tanh MLP, attention scaled by `query_pre_attn_scalar`, optional
final logit softcapping, and sliding-window layers beside global ones: a layer's `block_configs` attention
entry holds its `window_length` (None: global), and `rope_parameters` then has one entry per attention type.
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


def make_block(n_heads_in_group: Optional[int], intermediate_size: Optional[int],
               window_length: Optional[int] = None) -> dict:
    """One `block_configs` entry; None means the sublayer is absent (no-op). `window_length`: the layer's
    sliding attention window (DeciLM's name), kept even where its attention is absent, so that the layer's
    type survives a round trip through a standard config."""
    attention = {"no_op": n_heads_in_group is None, "replace_with_linear": False, "n_heads_in_group": n_heads_in_group}
    if window_length is not None:
        attention["window_length"] = window_length
    return {
        "attention": attention,
        "ffn": {"no_op": intermediate_size is None, "replace_with_linear": False,
                "intermediate_size": intermediate_size},
    }


# Attention types of a model with sliding-window layers (transformers' layer_types entries), in the order of
# their stacked RoPE tables; `rope_parameters` of such a model has one entry per type.
ATTENTION_TYPES = ("full_attention", "sliding_attention")


def attention_type(block) -> str:
    """The transformers layer type of a block_configs entry."""
    return "sliding_attention" if block["attention"].get("window_length") is not None else "full_attention"


def per_type_rope(config) -> bool:
    """The config's rope_parameters hold one entry per attention type (Gemma 3)."""
    return "full_attention" in (getattr(config, "rope_parameters", None) or {})


# The modules of each sublayer, by their standard checkpoint names: (branch, norm before it, norm after it).
# Llama-style pre-norm layers call the MLP's norm post_attention_layernorm; Gemma 3's sandwich layers use that
# name for the norm *after* attention. Indexed by the config's sandwich_norms.
SUBLAYER_MODULES = {
    False: {"attn": ("self_attn", "input_layernorm", None), "mlp": ("mlp", "post_attention_layernorm", None)},
    True: {"attn": ("self_attn", "input_layernorm", "post_attention_layernorm"),
           "mlp": ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")},
}
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


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
    # the inverse: an rtk config -> the standard config's keys for its biases (and Gemma's settings)
    standard: Callable[[object], dict] = lambda r: {}
    act_key: str = "hidden_act"  # the standard config's name for the MLP activation
    # Gemma 3: sandwich norms, (1 + w) RMSNorms, embeddings scaled by sqrt(hidden), BOS before every sequence
    gemma: bool = False


def _attention_bias(c) -> bool:
    return bool(getattr(c, "attention_bias", False))


def _gemma3_standard(r) -> dict:
    """Gemma 3 settings of an rtk config as Gemma3TextConfig keys (layer_types: every layer's, in order)."""
    return {"attention_bias": bool(r.attention_bias),
            "query_pre_attn_scalar": r.query_pre_attn_scalar, "final_logit_softcapping": r.final_logit_softcapping,
            "sliding_window": window_of(r), "layer_types": [attention_type(b) for b in r.block_configs]}


def window_of(config) -> Optional[int]:
    """The sliding window of a config's sliding layers (None: no sliding layer)."""
    return next((b["attention"]["window_length"] for b in config.block_configs
                 if b["attention"].get("window_length") is not None), None)


BASE_ARCHS: dict[str, BaseArch] = {
    "llama": BaseArch("LlamaForCausalLM", _attention_bias, _attention_bias,
                      standard=lambda r: {"attention_bias": bool(r.attention_bias), "mlp_bias": bool(r.mlp_bias)}),
    "mistral": BaseArch("MistralForCausalLM", lambda c: False, lambda c: False, fixed={"sliding_window": None}),
    "qwen2": BaseArch("Qwen2ForCausalLM", lambda c: True, lambda c: False, fixed={"use_sliding_window": False}),
    "qwen3": BaseArch("Qwen3ForCausalLM", _attention_bias, _attention_bias, qk_norm=True,
                      fixed={"use_sliding_window": False},
                      standard=lambda r: {"attention_bias": bool(r.attention_bias)}),
    "gemma3_text": BaseArch("Gemma3ForCausalLM", _attention_bias, _attention_bias, qk_norm=True,
                            fixed={"attn_logit_softcapping": None, "use_bidirectional_attention": False},
                            standard=_gemma3_standard, act_key="hidden_activation", gemma=True),
}
SKIP_NAMES = {"attention": "attn", "mlp": "mlp"}  # per_layer_config skip entry -> rtk sublayer kind
DECILM_ARCHITECTURE = "DeciLMForCausalLM"  # the architectures[] entry of a nemotron-nas config


class RtkDeciConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]
    _rope_type_labels = ATTENTION_TYPES  # transformers: rope_parameters may be nested by these (Gemma 3)

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
        sandwich_norms: bool = False,
        rms_norm_unit_offset: bool = False,
        scale_embeddings: bool = False,
        query_pre_attn_scalar: Optional[float] = None,
        final_logit_softcapping: Optional[float] = None,
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
        self.sandwich_norms = sandwich_norms  # a norm after each branch too (Gemma 3)
        self.rms_norm_unit_offset = rms_norm_unit_offset  # RMSNorm scales by (1 + w), in float32 (Gemma)
        self.scale_embeddings = scale_embeddings  # embeddings times sqrt(hidden_size) (Gemma)
        self.query_pre_attn_scalar = query_pre_attn_scalar  # attention scale = this ** -0.5 (None: head_dim)
        self.final_logit_softcapping = final_logit_softcapping
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
    """The rtk config of a standard Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 text config; its per_layer_config
    `skip` lists ("attention", "mlp") become absent sublayers, its layer_types (Gemma 3) each layer's window."""
    mt = getattr(c, "model_type", None)
    if mt not in BASE_ARCHS:
        raise ValueError(f"model_type '{mt}' is not one of {', '.join(BASE_ARCHS)}")
    spec = BASE_ARCHS[mt]
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default",
                                                    "rope_theta": getattr(c, "rope_theta", 10000.0)}
    act = getattr(c, spec.act_key)
    skips = layer_skips(c)
    if spec.gemma:
        types = list(c.layer_types)
        unknown = sorted(set(types) - set(ATTENTION_TYPES))
        if unknown or len(types) != c.num_hidden_layers:
            raise ValueError(f"layer_types: {unknown or len(types)} (rtk reads {c.num_hidden_layers} entries of "
                             f"{', '.join(ATTENTION_TYPES)})")
        windows = [c.sliding_window if t == "sliding_attention" else None for t in types]
        rope = {t: dict(rope[t]) for t in ATTENTION_TYPES}
        gemma = dict(sandwich_norms=True, rms_norm_unit_offset=True, scale_embeddings=True,
                     query_pre_attn_scalar=c.query_pre_attn_scalar,
                     final_logit_softcapping=getattr(c, "final_logit_softcapping", None))
    else:
        windows, gemma = [None] * len(skips), {}
    blocks = [make_block(None if "attention" in skip else heads // kv,
                         None if "mlp" in skip else c.intermediate_size, w) for skip, w in zip(skips, windows)]
    return RtkDeciConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        intermediate_size=c.intermediate_size, hidden_act="silu" if act in ("silu", "swish") else act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(rope), attention_bias=spec.o_bias(c), qkv_bias=spec.qkv_bias(c),
        mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=spec.qk_norm, block_configs=blocks,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), **gemma,
        bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
        pad_token_id=getattr(c, "pad_token_id", None), architectures=[DECILM_ARCHITECTURE],
        rtk_base_model_type=mt, **extra,
    )


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


class RtkRMSNorm(nn.Module):
    """Llama's RMSNorm (w * x, x cast back first), or Gemma's (`unit_offset`: (1 + w) * x in float32)."""

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _norm(config, size: int) -> RtkRMSNorm:
    return RtkRMSNorm(size, config.rms_norm_eps, bool(getattr(config, "rms_norm_unit_offset", False)))


class RtkEmbedding(nn.Embedding):
    """The token embedding, times sqrt(hidden_size) rounded to the weight's dtype where the config says (Gemma)."""

    def __init__(self, config):
        super().__init__(config.vocab_size, config.hidden_size)
        self.scale = config.hidden_size ** 0.5 if getattr(config, "scale_embeddings", False) else None

    def forward(self, input_ids):
        out = super().forward(input_ids)
        return out if self.scale is None else out * torch.tensor(self.scale, dtype=self.weight.dtype)


class RtkLMHead(nn.Linear):
    """The LM head, with final logit softcapping (cap * tanh(logits / cap)) where the config sets it."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, h):
        out = super().forward(h)
        return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RtkAttention(nn.Module):
    def __init__(self, config: RtkDeciConfig, n_heads_in_group: int, window_length: Optional[int] = None):
        super().__init__()
        self.window = window_length  # sliding window: a query sees itself and the window - 1 keys before it
        # which of the stacked RoPE tables this layer uses (None: the model has one)
        self.rope_index = ATTENTION_TYPES.index("sliding_attention" if window_length else "full_attention") \
            if per_type_rope(config) else None
        scalar = getattr(config, "query_pre_attn_scalar", None)
        self.scale = None if scalar is None else scalar ** -0.5
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
        if getattr(config, "qk_norm", False):  # Qwen3, Gemma 3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)

    def forward(self, x, cos, sin, mask, cache=None, cache_idx: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_index is not None:
            cos, sin = cos[self.rope_index], sin[self.rope_index]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, cache_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.window is not None:
            mask = self.windowed(mask, t, k.shape[-2], q.dtype, q.device)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def windowed(self, mask, q_len: int, kv_len: int, dtype, device):
        """`mask` (additive, [B, 1, T, P+T], or None for causal) with keys outside the sliding window masked:
        key j is seen from query i when i - window < j <= i (positions as cache indices, as transformers)."""
        if mask is None and kv_len <= self.window:
            return None  # the window covers every key: causal alone
        q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
        k_pos = torch.arange(kv_len, device=device)
        band = ((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - self.window))[None, None]
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(band, torch.zeros((), dtype=dtype, device=device) if mask is None else mask, neg)


class RtkMLP(nn.Module):
    def __init__(self, config: RtkDeciConfig, intermediate_size: int):
        super().__init__()
        h, bias = config.hidden_size, bool(config.mlp_bias)
        self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act '{config.hidden_act}' (rtk supports {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RtkDecoderLayer(nn.Module):
    """A pre-norm (or, with sandwich_norms, pre- and post-norm) layer: h += post(branch(pre(h))) for each
    sublayer; a removed sublayer's branch and norms are None (SUBLAYER_MODULES names them)."""

    def __init__(self, config: RtkDeciConfig, layer_idx: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.layer_idx = layer_idx
        self.names = SUBLAYER_MODULES[bool(getattr(config, "sandwich_norms", False))]
        for kind in ("attn", "mlp"):
            for name in self.names[kind]:
                if name is not None:
                    setattr(self, name, None)
        if not block.attention.no_op:
            self._build("attn", config, lambda: RtkAttention(config, block.attention.n_heads_in_group,
                                                             block.attention.get("window_length")))
        if not block.ffn.no_op:
            self._build("mlp", config, lambda: RtkMLP(config, block.ffn.intermediate_size))

    def _build(self, kind: str, config, branch) -> None:
        name, pre, post = self.names[kind]
        setattr(self, pre, _norm(config, config.hidden_size))
        setattr(self, name, branch())
        if post is not None:
            setattr(self, post, _norm(config, config.hidden_size))

    def _sublayer(self, kind: str, h, fn):
        _, pre, post = self.names[kind]
        out = fn(getattr(self, pre)(h))
        return h + (out if post is None else getattr(self, post)(out))

    def forward(self, h, cos, sin, mask, cache=None, cache_idx=0, skip_attn=False, skip_mlp=False):
        if self.self_attn is not None and not skip_attn:
            h = self._sublayer("attn", h, lambda x: self.self_attn(x, cos, sin, mask, cache, cache_idx))
        if self.mlp is not None and not skip_mlp:
            h = self._sublayer("mlp", h, self.mlp)
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
            (nn.init.zeros_ if module.unit_offset else nn.init.ones_)(module.weight)
        elif isinstance(module, RtkModel):  # a non-persistent buffer: from_pretrained never loads it
            with torch.no_grad():
                module.inv_freq.copy_(RtkModel._rope(module.config)[0].to(module.inv_freq.device))


class RtkModel(RtkPreTrainedModel):
    def __init__(self, config: RtkDeciConfig):
        super().__init__(config)
        self.embed_tokens = RtkEmbedding(config)
        self.layers = nn.ModuleList([RtkDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size)
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
        """(inv_freq, attention scaling); a config with one rope per attention type (Gemma 3) gets the tables
        stacked in ATTENTION_TYPES order ([2, head_dim / 2]; default or linear rope each, scaling 1)."""
        dim = config.head_dim
        if per_type_rope(config):
            tables = []
            for t in ATTENTION_TYPES:
                rope = config.rope_parameters[t]
                inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
                tables.append(inv / rope["factor"] if rope.get("rope_type") == "linear" else inv)
            return torch.stack(tables), 1.0
        rope = dict(config.rope_parameters or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)
        inv_freq = 1.0 / (rope.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    def rotary(self, position_ids, dtype):
        """cos, sin [B, T, head_dim] of the positions; [n_types, B, T, head_dim] with per-type ropes."""
        inv_freq = self.inv_freq.to(position_ids.device)
        if inv_freq.dim() == 2:
            freqs = position_ids[None, ..., None].float() * inv_freq[:, None, None, :]
        else:
            freqs = position_ids[..., None].float() * inv_freq
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

    def run_layers(self, h, cos, sin, mask, start=0, stop=None, skip=(), cache=None):
        """Layers [start, stop); `skip` holds names like 'attn.3' / 'mlp.7' bypassed at run time."""
        stop = len(self.layers) if stop is None else stop
        for i in range(start, stop):
            layer = self.layers[i]
            h = layer(h, cos, sin, mask, cache, self.cache_index[i],
                      skip_attn=f"attn.{i}" in skip, skip_mlp=f"mlp.{i}" in skip)
        return h

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, skip=(), **kwargs):
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
        self.lm_head = RtkLMHead(config)
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
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip=(),
                return_dict=True, hidden_only=False, **kwargs):
        """hidden_only: return the final normed hidden states [B, T, H] instead of logits (distillation computes
        the heads itself, chunk by chunk; a call of this module, not of .model, is what FSDP's hooks see)."""
        if hidden_only:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, skip=skip)
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
