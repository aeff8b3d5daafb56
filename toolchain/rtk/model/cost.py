"""Serving cost of a (pruned) model and of each sublayer, for a stated workload, on a roofline.

Workload: ``batch`` sequences, each with ``context`` tokens (recipe ``cost: {batch, context}``).
Hardware (defaults: one NVIDIA H200 SXM): ``bandwidth`` 4.8e12 B/s HBM, ``peak_flops`` 989e12 FLOP/s
dense BF16; weights and KV cache stored in ``bytes_per_el`` = 2 bytes (bf16), as served.

Per layer i (H query heads, K key/value heads, head dim d, hidden h, MLP width I, P_attn / P_mlp the
sublayer's parameters including its RMSNorm(s) and biases), one **decode step** (one new token per
sequence, B sequences, C cached tokens each) runs these kernels:

    attention projections  bytes = P_attn * w              flops = 2 * B * P_attn
    attention core         bytes = 2 * B * C * K * d * w   flops = 4 * B * H * d * C   (QK^T and AV)
    MLP                    bytes = P_mlp * w               flops = 2 * B * P_mlp
    LM head (always kept)  bytes = V * h * w               flops = 2 * B * V * h

where a sliding-window layer (Gemma 3) reads and attends to min(C, window) cached tokens in place of C;
and a kernel's time is ``max(bytes / bandwidth, flops / peak_flops)``; a sublayer's cost is the sum
over its kernels, in microseconds. The attention core's bytes are the KV cache read at every step:
removing an attention sublayer frees its KV cache (2*B*C*K*d*w bytes of memory) and its QK^T/AV
work, which a parameter count does not see. **Prefill** (B prompts of C tokens from scratch) uses
flops 2*B*C*P for projections/MLP, 4*B*H*d*C(C+1)/2 for the causal attention core (bytes: writing the
KV cache), and the LM head for the last token only. Activation traffic, embedding lookups, norms'
flops and kernel launch overheads are ignored. The ideal speedup of a pruned model is
``time(dense) / time(pruned)`` for the same workload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from rtk.model.sublayer import KINDS, RemovedSet, Sublayer


@dataclass(frozen=True)
class Hardware:
    name: str = "H200 SXM (4.8 TB/s HBM3e, 989 TFLOP/s dense BF16)"
    bandwidth: float = 4.8e12  # bytes / s
    peak_flops: float = 989e12  # FLOP / s
    bytes_per_el: int = 2  # bf16 weights and KV cache


H200 = Hardware()


@dataclass(frozen=True)
class Kernel:
    bytes: float
    flops: float

    def seconds(self, hw: Hardware) -> float:
        return max(self.bytes / hw.bandwidth, self.flops / hw.peak_flops)


def _dims(config, i: int) -> dict:
    b = config.block_configs[i]
    h, heads, d = config.hidden_size, config.num_attention_heads, config.head_dim
    out = {"h": h, "H": heads, "d": d, "K": None, "I": None, "P_attn": 0, "P_mlp": 0,
           "window": b["attention"].get("window_length")}
    post = h * bool(getattr(config, "sandwich_norms", False))  # Gemma 3's norm after each branch
    if not b["attention"]["no_op"]:
        kv = heads // b["attention"]["n_heads_in_group"]
        qkv_bias = bool(config.qkv_bias)  # as modeling_rtk and vLLM: q/k/v biases follow qkv_bias
        p = h * heads * d + 2 * h * kv * d + heads * d * h + h + post  # q, k, v, o, input norm (and post norm)
        p += (heads * d + 2 * kv * d) * qkv_bias + h * bool(config.attention_bias)
        p += 2 * d * bool(getattr(config, "qk_norm", False))  # Qwen3's / Gemma's per-head q/k RMSNorm weights
        out.update(K=kv, P_attn=p)
    if not b["ffn"]["no_op"]:
        inter = b["ffn"]["intermediate_size"]
        out.update(I=inter, P_mlp=3 * h * inter + h + post + (2 * inter + h) * bool(config.mlp_bias))
    return out


def sublayer_kernels(config, kind: str, layer: int, batch: int, context: int, phase: str = "decode",
                     hw: Hardware = H200) -> list[Kernel]:
    """The kernels removing `kind` ('attn' | 'mlp') of `layer` saves; [] where it is already absent."""
    dm, w, B, C = _dims(config, layer), hw.bytes_per_el, batch, context
    toks = B if phase == "decode" else B * C
    if kind == "mlp":
        return [Kernel(dm["P_mlp"] * w, 2 * toks * dm["P_mlp"])] if dm["P_mlp"] else []
    if not dm["P_attn"]:
        return []
    seen = C if dm["window"] is None else min(C, dm["window"])  # the cached tokens a query attends to
    kv_bytes = 2 * B * seen * dm["K"] * dm["d"] * w
    if phase == "decode":
        core = Kernel(kv_bytes, 4 * B * dm["H"] * dm["d"] * seen)
    else:  # query t attends to min(t, window) keys
        pairs = seen * (seen + 1) / 2 + (C - seen) * seen
        core = Kernel(kv_bytes, 4 * B * dm["H"] * dm["d"] * pairs)
    return [Kernel(dm["P_attn"] * w, 2 * toks * dm["P_attn"]), core]


def head_kernel(config, batch: int, hw: Hardware = H200) -> Kernel:
    """LM head for one token per sequence (decode, and the last prompt token in prefill)."""
    vh = config.vocab_size * config.hidden_size
    return Kernel(vh * hw.bytes_per_el, 2 * batch * vh)


def sublayer_cost(config, name: str, batch: int, context: int, phase: str = "decode", hw: Hardware = H200) -> float:
    """Microseconds per step saved by removing `name` ('attn.i', 'mlp.i' or 'layer.i')."""
    total = 0.0
    for s in Sublayer.parse(name).split():
        total += sum(k.seconds(hw) for k in sublayer_kernels(config, s.kind, s.layer, batch, context, phase, hw))
    return total * 1e6


def sublayer_cost_fn(config, cost_cfg, hw: Hardware = H200) -> Callable:
    """Candidate -> microseconds per step it saves for the recipe's workload (normalize: cost; cost.phase, decode
    unless the recipe says prefill)."""
    def fn(cand) -> float:
        return sublayer_cost(config, cand.name, cost_cfg.batch, cost_cfg.context, cost_cfg.phase, hw)

    return fn


def model_cost(config, batch: int, context: int, phase: str = "decode", removed: Iterable[str] = (),
               hw: Hardware = H200) -> dict:
    """Bytes moved, FLOPs, KV-cache bytes and roofline time of one step of the whole model."""
    gone = RemovedSet.of(removed)
    kernels, kv_cache = [head_kernel(config, batch, hw)], 0
    for i in range(config.num_hidden_layers):
        for kind in KINDS:
            if gone.lacks(kind, i):
                continue
            ks = sublayer_kernels(config, kind, i, batch, context, phase, hw)
            kernels += ks
            if kind == "attn" and ks:
                kv_cache += ks[1].bytes  # the cache read (decode) or written (prefill)
    return {"phase": phase, "batch": batch, "context": context,
            "bytes": sum(k.bytes for k in kernels), "flops": sum(k.flops for k in kernels),
            "kv_cache_bytes": kv_cache, "seconds": sum(k.seconds(hw) for k in kernels)}


def model_params(config) -> int:
    """Every parameter of the model: its sublayers (as above, norms and biases included), the embedding,
    the LM head unless tied, the final norm; equals rtk.model.params.total_params of the loaded model."""
    body = sum(_dims(config, i)["P_attn"] + _dims(config, i)["P_mlp"] for i in range(config.num_hidden_layers))
    vh = config.vocab_size * config.hidden_size
    return body + vh * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def workload_cost(config, prompt_len: int, output_len: int, batch: int = 1, hw: Hardware = H200) -> dict:
    """A whole request workload: prefill of `batch` prompts of `prompt_len` tokens, then `output_len`
    decode steps at contexts prompt_len, prompt_len + 1, ... (sums of model_cost over the steps)."""
    pre = model_cost(config, batch, prompt_len, "prefill", hw=hw)
    steps = [model_cost(config, batch, prompt_len + t, "decode", hw=hw) for t in range(output_len)]
    return {"prefill_flops": pre["flops"], "prefill_seconds": pre["seconds"],
            "decode_flops": sum(x["flops"] for x in steps), "decode_bytes": sum(x["bytes"] for x in steps),
            "decode_seconds": sum(x["seconds"] for x in steps),
            "kv_bytes_per_token": model_cost(config, 1, 1, "decode", hw=hw)["kv_cache_bytes"],
            "params": model_params(config)}


def ideal_speedup(config, removed: Iterable[str], batch: int, context: int, phase: str = "decode",
                  hw: Hardware = H200) -> dict:
    """Dense vs pruned cost of one step for the workload, and time(dense) / time(pruned)."""
    before = model_cost(config, batch, context, phase, (), hw)
    after = model_cost(config, batch, context, phase, removed, hw)
    return {"before": before, "after": after, "speedup": before["seconds"] / after["seconds"],
            "kv_cache_ratio": after["kv_cache_bytes"] / before["kv_cache_bytes"] if before["kv_cache_bytes"] else 1.0,
            "hardware": hw.name}
