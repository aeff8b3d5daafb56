"""The safetensors export of `rtk prune` with `scoring.offload: disk`: the kept tensors copied from the source
shards one tensor at a time, never the whole model in memory.

The folder is the one `export_model` writes for the same plan (same layout choice, config, tensor names,
bytes; tested): the pruned config is derived from the source config, a meta skeleton of the pruned model
names every tensor and its shape, and each output shard is written by `write_safetensors`, which lays out
the header first and then streams the tensors in. Verification runs through the same layer-by-layer
engine as the search (`rtk.scoring.offload.streamed_logits`): the written folder, read back from disk,
against the original read from its shards with the removed sublayers skipped, on the probe batch.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..device import DTYPES
from ..errors import RtkError
from ..modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM
from ..rewrite import MODELING_FILE, atomic_write_dir, expand, pruned_config
from ..scoring.offload import DiskOffload, WeightFiles, streamed_logits
from .card import model_card
from .safetensors import (STANDARD, VLLM_VERSION, _standard_config, removed_sublayers, standard_base,
                          vllm_blocker, weight_bytes)
from .verify import Verification, probe_inputs

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


def _native_files(cfg: RtkDeciConfig, dtype: str, out: Path, vllm_note: Optional[str]) -> RtkDeciLMForCausalLM:
    """config.json (+ modeling_rtk.py) of a DeciLM folder, as save_native writes them; the meta skeleton."""
    cfg = RtkDeciConfig(**cfg.to_dict())
    cfg.dtype = dtype
    if vllm_note:
        cfg.rtk_vllm_servable = False
        cfg.rtk_vllm_note = vllm_note
    elif hasattr(cfg, "rtk_vllm_servable"):
        del cfg.rtk_vllm_servable
    cfg.architectures = ["DeciLMForCausalLM"]
    cfg.auto_map = {"AutoConfig": "modeling_rtk.RtkDeciConfig",
                    "AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
    cfg.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    shutil.copy(MODELING_FILE, out / "modeling_rtk.py")
    with torch.device("meta"):
        return RtkDeciLMForCausalLM(cfg)


def export_streamed(source_folder: str, config: RtkDeciConfig, removed: Iterable[str], tokenizer, out: Path, *,
                    dtype: str, device: str, plan: Optional[dict] = None, recipe_yaml: Optional[str] = None,
                    transformers_only: bool = False, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the pruned model (source folder's weights minus `removed`) as `export_model` would, streaming."""
    out = Path(out)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    tdtype = DTYPES[dtype]
    removed = sorted(expand(removed))
    cfg = pruned_config(config, removed)
    base = standard_base(cfg)
    layout = "standard" if base else "native"
    blocker = vllm_blocker(cfg) if layout == "native" else None
    vllm_note = None
    if blocker:
        vllm_note = (f"stock vLLM {VLLM_VERSION} cannot serve this folder: its first remaining sublayer is "
                     f"{blocker} (an MLP before any attention), and vLLM's DeciLM layer crashes there")
        if not transformers_only:
            raise RtkError(f"plan: {vllm_note}; keep attn.0 (search.protect) or pass --transformers-only")
    src = WeightFiles(source_folder)
    gen = Path(source_folder) / "generation_config.json"
    tmp = atomic_write_dir(out)
    try:
        if layout == "standard":
            from transformers import AutoModelForCausalLM, GenerationConfig

            keep = [i for i, b in enumerate(cfg.block_configs) if not b.attention.no_op]
            hf_cfg = _standard_config(cfg, base, len(keep), tdtype)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(hf_cfg, dtype=tdtype)
            hf_cfg.save_pretrained(tmp)
            (GenerationConfig.from_pretrained(source_folder) if gen.is_file()
             else GenerationConfig.from_model_config(hf_cfg)).save_pretrained(tmp)

            def source_key(k: str) -> str:
                m = re.match(r"^model\.layers\.(\d+)\.(.*)$", k)
                return f"model.layers.{keep[int(m.group(1))]}.{m.group(2)}" if m else k
        else:
            skeleton = _native_files(cfg, dtype, tmp, vllm_note)
            if gen.is_file():
                shutil.copy(gen, tmp / "generation_config.json")

            def source_key(k: str) -> str:
                return k
        sd = skeleton.state_dict()
        specs = [(k, tdtype if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in sd.items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
        src_keys = {k: source_key(k) for k, _, _ in specs}

        def tensor(k: str) -> torch.Tensor:
            return src.read([src_keys[k]], "cpu", tdtype)[src_keys[k]]

        write_shards(tmp, specs, tensor, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written_cfg = RtkDeciConfig.from_pretrained(tmp) if layout == "native" else _dense_rtk_config(tmp)
        check = _verify(tmp, written_cfg, source_folder, config, removed, tdtype, device)
        check.raise_on_mismatch(f"-o {out}")
        summary = {
            "layout": layout,
            "architecture": STANDARD[base].hf_class if base else "DeciLMForCausalLM",
            "base_model_type": getattr(cfg, "rtk_base_model_type", None),
            "dtype": dtype,
            "removed_sublayers": removed_sublayers(cfg),
            "params": sum(int(torch.Size(s).numel()) for _, _, s in specs),
            "params_before": plan.get("params_total") if plan else None,
            "weight_bytes": weight_bytes(tmp),
            "vllm_servable": vllm_note is None,
            "vllm": vllm_note or f"served natively by stock vLLM {VLLM_VERSION}"
                                 + (" (--trust-remote-code)" if layout == "native" else ""),
            "verification": check.lines(),
            "verification_inputs": check.shape,
            "streamed": True,
        }
        if plan is not None:
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "README.md").write_text(model_card(summary, plan, source_folder))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _dense_rtk_config(folder: Path):
    from ..arch import rtk_config_from_hf
    from ..load import load_hf_config

    return rtk_config_from_hf(load_hf_config(str(folder)))


def _verify(written: Path, written_cfg, source_folder: str, source_cfg, removed, dtype: torch.dtype,
            device: str) -> Verification:
    """Logits of the written folder vs the source with `removed` skipped, both read layer by layer from disk,
    in float32 on the scoring device (the source rounded to the exported dtype first)."""
    inputs = probe_inputs(source_cfg.vocab_size)

    def run(folder, cfg, skip=(), round_to=None):  # one model's embeddings and head held at a time
        src = DiskOffload(folder, cfg, device, torch.float32, round_to=round_to)
        try:
            return streamed_logits(src, inputs, skip).cpu()
        finally:
            src.close()
            del src

    got = run(written, written_cfg)
    want = run(source_folder, source_cfg, removed, dtype)
    v = Verification()
    v.add("the original model run with the removed sublayers skipped (read layer by layer from disk)", got, want)
    return v


__all__ = ["export_streamed", "write_safetensors", "write_shards"]
