"""The safetensors export of `rtk prune` with `scoring.offload: disk`: the kept tensors copied from the source
shards one tensor at a time, never the whole model in memory.

The folder is the one `export_model` writes for the same plan (the same `choose_layout` and `write_layout`,
so the same config, tensor names and bytes; tested); only where the tensors come from differs. Verification
runs through the same layer-by-layer engine as the search (`rtk.model.layers.streamed_logits`): the
written folder, read back from disk, against the original read from its shards with the removed sublayers
skipped, on the probe batch; one model's embeddings and head are held at a time.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from rtk.model.device import DTYPES
from rtk.errors import RtkError
from rtk.model.modeling_rtk import RtkDeciConfig
from rtk.model.rewrite import pruned_config
from rtk.model.sublayer import RemovedSet
from rtk.outdir import temp_dir_beside
from rtk.model.layers import DiskOffload, WeightFiles, streamed_logits
from rtk.export.configs import choose_layout
from rtk.export.safetensors import finish, generation_config_of, summary_of, write_layout
from rtk.export.shards import SHARD_BYTES
from rtk.export.verify import Verification, check_removed, probe_inputs


def export_streamed(source_folder: str, config: RtkDeciConfig, removed: Iterable[str], tokenizer, out: Path, *,
                    dtype: str, device: str, plan: Optional[dict] = None, recipe_yaml: Optional[str] = None,
                    layout: Optional[str] = None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the source folder's model minus `removed` as `export_model` would, one tensor at a time."""
    out = Path(out)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    tdtype = DTYPES[dtype]
    removed = RemovedSet.of(removed)
    cfg = pruned_config(config, removed)
    layout = choose_layout(cfg, layout)
    src = WeightFiles(source_folder)
    tmp = temp_dir_beside(out)
    try:
        params = 0

        def tensor(name: str) -> torch.Tensor:
            nonlocal params
            t = src.read([name], "cpu", tdtype)[name]
            params += t.numel()
            return t

        write_layout(cfg, layout, tdtype, tmp, generation_config_of(source_folder), tensor, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_removed(tmp, removed, layout)
        check = _verify(tmp, source_folder, config, removed, tdtype, device)
        check.raise_on_mismatch(f"-o {out}")
        summary = summary_of(cfg, layout, dtype, params, plan.get("params_total") if plan else None, tmp, check)
        summary["streamed"] = True
        finish(tmp, out, summary, plan, recipe_yaml, source_folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _verify(written: Path, source_folder: str, source_cfg, removed, dtype: torch.dtype, device: str) -> Verification:
    """Logits of the written folder vs the source with `removed` skipped, both read layer by layer from disk,
    in float32 on the scoring device (the source rounded to the exported dtype first)."""
    from rtk.model.arch import rtk_config_from_hf
    from rtk.model.load import load_hf_config

    inputs = probe_inputs(source_cfg.vocab_size)

    def run(folder, cfg, skip=(), round_to=None):  # one model's embeddings and head held at a time
        src = DiskOffload(folder, cfg, device, torch.float32, round_to=round_to)
        try:
            return streamed_logits(src, inputs, skip).cpu()
        finally:
            src.close()

    got = run(written, rtk_config_from_hf(load_hf_config(str(written))))
    want = run(source_folder, source_cfg, removed, dtype)
    v = Verification()
    v.add("the original model run with the removed sublayers skipped (read layer by layer from disk)", got, want)
    return v
