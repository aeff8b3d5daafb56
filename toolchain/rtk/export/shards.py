"""Safetensors files written one tensor at a time: the header first (every name, dtype, shape and offset is
known from a meta skeleton), then each tensor's bytes as it is produced, so memory holds one tensor."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Optional

import torch

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
             torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}
SHARD_BYTES = 5 * 10 ** 9  # as transformers' max_shard_size="5GB"


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple]], tensor: Callable[[str], torch.Tensor],
                      metadata: Optional[dict] = None) -> int:
    """Write a .safetensors file whose tensors are produced one at a time by `tensor(name)`; returns its bytes.
    `specs` are (name, dtype, shape) in file order; the header is written first, so memory holds one tensor."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata or {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            t = tensor(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: got {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
            f.write(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
            del t
    return 8 + len(raw) + offset


def write_shards(out: Path, specs: list[tuple[str, torch.dtype, tuple]], tensor: Callable[[str], torch.Tensor],
                 shard_bytes: int = SHARD_BYTES) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json past shard_bytes."""
    def size(s):
        return int(torch.Size(s[2]).numel()) * torch.empty((), dtype=s[1]).element_size()

    shards, cur, cur_bytes = [], [], 0
    for s in specs:
        if cur and cur_bytes + size(s) > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += size(s)
    shards.append(cur)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], tensor)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, tensor)
        for s in shard:
            weight_map[s[0]] = name
            total += size(s)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
