"""Ideal speedup of a pruned model folder over its original for a bench workload, from the roofline
cost model of rtk.model.cost (one cost model for search and bench): the FLOPs ratio for prefill
(compute-bound) and the ratio of bytes read (weights + KV cache) for decode (memory-bound)."""
from __future__ import annotations

import math

from rtk.model.cost import Hardware, workload_cost


def ideal(base, cand, prompt_len: int, output_len: int, batch: int = 1, dtype_bytes: int = 4) -> dict:
    """Ideal speedups (baseline cost / candidate cost) of the workload, with weights and KV cache stored
    in `dtype_bytes` bytes per element."""
    hw = Hardware(name=f"roofline, {dtype_bytes}-byte elements", bytes_per_el=dtype_bytes)
    a = workload_cost(base, prompt_len, output_len, batch, hw)
    b = workload_cost(cand, prompt_len, output_len, batch, hw)
    r = lambda k: a[k] / b[k] if b[k] else math.nan  # noqa: E731
    return {"param_ratio": b["params"] / a["params"], "ideal_prefill_speedup": r("prefill_flops"),
            "ideal_decode_speedup": r("decode_bytes"), "ideal_decode_flops_speedup": r("decode_flops"),
            "kv_bytes_ratio": b["kv_bytes_per_token"] / a["kv_bytes_per_token"] if a["kv_bytes_per_token"] else math.nan,
            "workload": {"prompt_len": prompt_len, "output_len": output_len, "batch": batch,
                         "dtype_bytes": dtype_bytes}}
