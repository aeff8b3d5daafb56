"""Scoring: PPL of the model with any set of sublayers skipped, for every candidate of a search step (or, given
the unpruned model's `teacher_logprobs`, exp(mean KL) from its next-token distributions).

- `candidates`: what a search may remove, and parameter counts;
- `per_candidate`: one candidate after another over the model in memory (activation reuse);
- `layer_major`: one pass over the layers per step, all candidates' activation streams batched per layer;
- `workers`: Ray actors, each with its own replica or offloaded streamer, sharing the candidates;
- `influence`: block influence, one pass of the dense model (the bi criterion of rtk.prune.criteria).

Where the layers' weights come from (in memory, host memory, the safetensors files: `scoring.offload`) is
rtk.model.layers' (InMemory, CpuOffload, DiskOffload).

`load_for_scoring` and `scorer_for` turn a recipe's `device`, `dtype` and `scoring:` into these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rtk.errors import RtkError
from rtk.prune.scoring.candidates import candidates, existing_names
from rtk.prune.scoring.per_candidate import ModelScorer


@dataclass
class Loaded:
    """A model opened for scoring. `model` is the whole model (offload none / cpu) or a skeleton whose
    layers are on the meta device (offload disk); `source` gives every engine its layers."""

    model: object
    tokenizer: object
    path: str  # local folder or hub id, as rtk.model.load.resolve gives it
    source: object
    offload: str

    @property
    def in_memory(self) -> bool:
        return self.offload != "disk"

    def close(self) -> None:
        self.source.close()


def load_for_scoring(recipe, device: Optional[str] = None) -> Loaded:
    """Open the recipe's model where `scoring.offload` says (device and dtype already resolved).
    `device` overrides the recipe's (the driver of Ray workers keeps its copy on the CPU)."""
    from rtk.model.device import DTYPES
    from rtk.model.load import load_model, load_tokenizer, resolve
    from rtk.model.layers import CpuOffload, DiskOffload, InMemory, local_folder

    device = device or recipe.device
    offload = recipe.scoring.offload
    dtype = DTYPES[recipe.dtype]
    if offload == "disk":
        from rtk.model.arch import check_supported, rtk_config_from_hf
        from rtk.model.load import load_hf_config

        path = resolve(recipe.model)
        folder = local_folder(path)
        hf_config = load_hf_config(str(folder))
        check_supported(hf_config, f"model: {recipe.model}")
        source = DiskOffload(folder, rtk_config_from_hf(hf_config), device, dtype)
        return Loaded(source.model, load_tokenizer(str(folder)), str(folder), source, offload)
    if offload == "cpu":
        model, tok, path = load_model(recipe.model, recipe.dtype, "cpu")
        return Loaded(model, tok, path, CpuOffload(model, device) if device != "cpu" else InMemory(model), offload)
    model, tok, path = load_model(recipe.model, recipe.dtype, device)
    return Loaded(model, tok, path, InMemory(model), offload)


def scorer_for(recipe, loaded: Loaded, blocks, progress: bool = True, pool=None, name: str = "calibration",
               ppl_only: bool = False, teacher_logprobs=None):
    """The engine the recipe's `scoring:` asks for, over `blocks` (a RayScorer when `pool` is given).
    `ppl_only`: only `ppl()` will be asked (evaluation), so one activation stream must fit, not three."""
    s = recipe.scoring
    if pool is not None:
        if teacher_logprobs is not None:
            raise RtkError("search criterion kl: not supported with scoring.workers > 1 (Ray); use one worker")
        from rtk.prune.scoring.workers import RayScorer

        return RayScorer(pool, name, blocks, progress, ppl_only)
    if s.engine == "per-candidate":
        return ModelScorer(loaded.model, blocks, s.batch_size, s.reuse_activations, progress, teacher_logprobs)
    from rtk.prune.scoring.layer_major import LayerMajorScorer

    return LayerMajorScorer(loaded.source, blocks, s.batch_size, s.memory_bytes, s.streams, progress, ppl_only,
                            teacher_logprobs)


__all__ = ["Loaded", "ModelScorer", "candidates", "existing_names", "load_for_scoring", "scorer_for"]
