"""Parameters, FLOPs and bytes of a model folder's config for a given workload, and the ideal
speedup of a pruned model: the FLOPs ratio for prefill (compute-bound) and the bytes ratio
(weights + KV cache read per step) for decode (memory-bound)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layer:
    n_heads: int = 0      # 0: no attention
    n_kv_heads: int = 0
    intermediate: int = 0  # 0: no MLP


@dataclass(frozen=True)
class Shape:
    hidden: int
    head_dim: int
    vocab: int
    tied: bool
    layers: tuple[Layer, ...]

    def attn_params(self, l: Layer) -> int:
        if not l.n_heads:
            return 0
        h, d = self.hidden, self.head_dim
        return 2 * h * l.n_heads * d + 2 * h * l.n_kv_heads * d + h  # q, o, k, v, norm

    def mlp_params(self, l: Layer) -> int:
        return 3 * self.hidden * l.intermediate + self.hidden if l.intermediate else 0

    def params(self) -> int:
        body = sum(self.attn_params(l) + self.mlp_params(l) for l in self.layers)
        return body + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def matmul_params(self) -> int:
        """Weights multiplied per token: every projection and the LM head (not the embedding lookup)."""
        body = sum(self.attn_params(l) + self.mlp_params(l) - self.hidden * ((l.n_heads > 0) + (l.intermediate > 0))
                   for l in self.layers)
        return body + self.vocab * self.hidden


def _ffn_size(ffn: dict, hidden: int) -> int:
    if ffn.get("intermediate_size"):
        return int(ffn["intermediate_size"])
    size = int(2 * float(ffn["ffn_mult"]) * hidden / 3)  # vLLM's nemotron_nas rule
    return size + (-size) % 256


def shape_of(config: dict) -> Shape:
    h, nh = int(config["hidden_size"]), int(config["num_attention_heads"])
    d = int(config.get("head_dim") or h // nh)
    if config.get("block_configs"):
        layers = []
        for b in config["block_configs"]:
            a, f = b["attention"], b["ffn"]
            n_att = 0 if a.get("no_op") else nh
            n_kv = 0 if a.get("no_op") else nh // int(a["n_heads_in_group"])
            layers.append(Layer(n_att, n_kv, 0 if f.get("no_op") else _ffn_size(f, h)))
    else:
        kv = int(config.get("num_key_value_heads") or nh)
        layers = [Layer(nh, kv, int(config["intermediate_size"]))] * int(config["num_hidden_layers"])
    return Shape(h, d, int(config["vocab_size"]), bool(config.get("tie_word_embeddings", False)), tuple(layers))


def read_shape(folder) -> Optional[Shape]:
    """The folder's shape, or None where its config.json is missing or not a Llama-family config."""
    cfg = Path(folder) / "config.json"
    try:
        return shape_of(json.loads(cfg.read_text())) if cfg.is_file() else None
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def workload_cost(s: Shape, prompt_len: int, output_len: int, batch: int = 1, dtype_bytes: int = 4) -> dict:
    """FLOPs of prefill and decode, and bytes read by decode, for `batch` sequences."""
    w = s.matmul_params()
    attn_width = sum(l.n_heads for l in s.layers) * s.head_dim
    kv_width = sum(2 * l.n_kv_heads for l in s.layers) * s.head_dim  # K and V values per token
    p = prompt_len
    prefill = batch * (2 * w * p + 4 * attn_width * p * (p + 1) / 2)
    ctx_sum = sum(p + t for t in range(output_len))  # context length seen by each decode step
    decode = batch * (2 * w * output_len + 4 * attn_width * ctx_sum)
    decode_bytes = dtype_bytes * (w * output_len + batch * kv_width * ctx_sum)
    return {"prefill_flops": prefill, "decode_flops": decode, "decode_bytes": decode_bytes,
            "kv_bytes_per_token": dtype_bytes * kv_width, "params": s.params()}


def ideal(base: Shape, cand: Shape, prompt_len: int, output_len: int, batch: int = 1, dtype_bytes: int = 4) -> dict:
    """Ideal speedups (baseline cost / candidate cost) of the workload."""
    a = workload_cost(base, prompt_len, output_len, batch, dtype_bytes)
    b = workload_cost(cand, prompt_len, output_len, batch, dtype_bytes)
    r = lambda k: a[k] / b[k] if b[k] else math.nan  # noqa: E731
    return {"param_ratio": b["params"] / a["params"], "ideal_prefill_speedup": r("prefill_flops"),
            "ideal_decode_speedup": r("decode_bytes"), "ideal_decode_flops_speedup": r("decode_flops"),
            "kv_bytes_ratio": b["kv_bytes_per_token"] / a["kv_bytes_per_token"] if a["kv_bytes_per_token"] else math.nan,
            "workload": {"prompt_len": prompt_len, "output_len": output_len, "batch": batch,
                         "dtype_bytes": dtype_bytes}}
