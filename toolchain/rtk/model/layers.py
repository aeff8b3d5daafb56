"""Where a scoring engine gets each layer's weights: a `LayerSource`.

- `InMemory`: the model is on the scoring device; a layer is its module.
- `CpuOffload`: the layers stay in host memory (pinned on CUDA); each is copied to the device when it is
  used and dropped after, the next one copied while the current one computes.
- `DiskOffload`: the layers stay in the safetensors files; a meta skeleton holds the architecture, and a
  layer's tensors are read from their shard (`safe_open`, that layer's keys only) when it is used and
  dropped after. Embeddings, final norm and LM head are the only weights held.

A layer is run with `torch.func.functional_call` on its (meta or host) module and the device tensors, so
every source runs exactly the module code the in-memory model runs. `streamed_logits` runs a whole
forward pass (padding mask, position ids) layer by layer through any source: export verification of an
offloaded run uses it, so no step of `rtk prune` needs the whole model in memory.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.func import functional_call

from rtk.errors import RtkError
from rtk.model.modeling_rtk import RtkDeciLMForCausalLM, RtkModel
from rtk.model.sublayer import RemovedSet

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class LayerSource:
    """Embeddings, the layers one at a time, and the head, on `device`."""

    def __init__(self, model: RtkDeciLMForCausalLM, device, dtype: torch.dtype):
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_layers = len(model.model.layers)
        self.weight_reads = 0  # layers brought to the device

    # ---- what every engine calls ----
    def rotary(self, position_ids: torch.Tensor):
        return self.model.model.rotary(position_ids.to(self.device), self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids.to(self.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h))

    def layers(self, start: int = 0, stop: Optional[int] = None):
        """Yields (i, run) for layers [start, stop): run(h, cos, sin, mask, skip_attn, skip_mlp) -> h.
        The next layer's weights are fetched while the caller computes with the current one."""
        stop = self.n_layers if stop is None else stop
        for i in range(start, stop):
            yield i, self._runner(i)

    def _runner(self, i: int):
        layer = self.model.model.layers[i]

        def run(h, cos, sin, mask, skip_attn=False, skip_mlp=False):
            return layer(h, cos, sin, mask, None, 0, skip_attn=skip_attn, skip_mlp=skip_mlp)

        return run

    def close(self) -> None:
        pass


class InMemory(LayerSource):
    """The whole model on the scoring device."""

    def __init__(self, model: RtkDeciLMForCausalLM):
        p = next(model.parameters())
        super().__init__(model, p.device, p.dtype)


class _Streamed(LayerSource):
    """Layers fetched one at a time (and prefetched one ahead) as {name: device tensor}."""

    def __init__(self, model, device, dtype):
        super().__init__(model, device, dtype)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rtk-prefetch")

    def fetch(self, i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layers(self, start: int = 0, stop: Optional[int] = None):
        stop = self.n_layers if stop is None else stop
        nxt = self._pool.submit(self.fetch, start) if start < stop else None
        for i in range(start, stop):
            weights = nxt.result()
            nxt = self._pool.submit(self.fetch, i + 1) if i + 1 < stop else None
            self.weight_reads += 1
            layer = self.model.model.layers[i]

            def run(h, cos, sin, mask, skip_attn=False, skip_mlp=False, _l=layer, _w=weights):
                return functional_call(_l, _w, (h, cos, sin, mask, None, 0),
                                       {"skip_attn": skip_attn, "skip_mlp": skip_mlp})

            yield i, run
            del weights, run
        if nxt is not None:
            nxt.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CpuOffload(_Streamed):
    """The model in host memory; each layer copied to the device when used."""

    def __init__(self, model: RtkDeciLMForCausalLM, device):
        dtype = next(model.parameters()).dtype
        super().__init__(model, device, dtype)
        self.pin = self.device.type == "cuda"
        if self.pin:
            for layer in model.model.layers:
                for p in layer.parameters():
                    p.data = p.data.pin_memory()
        for m in (model.model.embed_tokens, model.model.norm, model.lm_head):
            m.to(self.device)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        model.model.inv_freq = model.model.inv_freq.to(self.device)

    def fetch(self, i: int) -> dict[str, torch.Tensor]:
        layer = self.model.model.layers[i]
        return {k: v.to(self.device, non_blocking=self.pin) for k, v in layer.state_dict().items()}


class WeightFiles:
    """The tensors of a safetensors checkpoint folder (one file or an index of shards), by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (self.folder / "model.safetensors").is_file():
            files = [self.folder / "model.safetensors"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise RtkError(f"scoring.offload: disk: {self.folder} has no .safetensors weights")
        from safetensors import safe_open

        self.file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.file_of[k] = f
        self.by_layer: dict[int, list[str]] = {}
        for k in self.file_of:
            m = LAYER_KEY.match(k)
            if m:
                self.by_layer.setdefault(int(m.group(1)), []).append(k)

    def read(self, keys: Iterable[str], device, dtype: Optional[torch.dtype] = None,
             round_to: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The named tensors, each read from its shard and cast/moved (`round_to`: rounded to that dtype
        first, as an export to it would store them); the shard is closed again."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.file_of:
                raise RtkError(f"scoring.offload: disk: tensor {k} is not in {self.folder}")
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    t = h.get_tensor(k)
                    if round_to is not None and t.is_floating_point():
                        t = t.to(round_to)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[k] = t.to(device)  # on the CPU in the stored dtype: backed by the file, no copy
        return out


def local_folder(path: str) -> Path:
    """A local folder for a hub id (downloaded once into the hub cache), or the folder itself."""
    p = Path(path)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:
        raise RtkError(f"model: {path}: cannot fetch its safetensors files for offload: disk "
                       f"({type(exc).__name__}: {exc})") from None


class DiskOffload(_Streamed):
    """A meta skeleton; embeddings, norm and head read once; every layer read from disk when used."""

    def __init__(self, folder: str | Path, config, device, dtype: torch.dtype,
                 round_to: Optional[torch.dtype] = None):
        self.files = WeightFiles(folder)
        self.round_to = round_to
        with torch.device("meta"):
            model = RtkDeciLMForCausalLM(config)
        names = [k for k in model.state_dict() if not LAYER_KEY.match(k)]
        if config.tie_word_embeddings:
            names = [k for k in names if k != "lm_head.weight"]
        have = self.files.read(names, device, dtype, round_to)
        model.load_state_dict(have, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.model.inv_freq = RtkModel._rope(config)[0].to(device)
        model.eval()
        super().__init__(model, device, dtype)
        self._layer_keys = {}
        for i, layer in enumerate(model.model.layers):
            want = {f"model.layers.{i}.{k}" for k in layer.state_dict()}
            have_i = set(self.files.by_layer.get(i, ()))
            missing = want - have_i
            if missing:
                raise RtkError(f"scoring.offload: disk: {folder} lacks {sorted(missing)[0]} "
                               f"(and {len(missing) - 1} more) for layer {i}")
            self._layer_keys[i] = sorted(want)

    def fetch(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        got = self.files.read(self._layer_keys[i], self.device, self.dtype, self.round_to)
        return {k[len(prefix):]: v for k, v in got.items()}


@torch.no_grad()
def streamed_logits(source: LayerSource, inputs: dict, skip: Iterable[str] = ()) -> torch.Tensor:
    """Float32 logits at the non-padded positions ([n_tokens, vocab]) of a whole forward pass run layer
    by layer through `source`, with `skip` bypassed: the same arithmetic as the model's forward."""
    skip = RemovedSet.of(skip)
    ids = inputs["input_ids"].to(source.device)
    mask = inputs.get("attention_mask")
    pos = inputs.get("position_ids")
    h = source.embed(ids)
    if pos is None:
        pos = torch.arange(ids.shape[1])[None]
    cos, sin = source.rotary(pos)
    am = RtkModel.build_mask(mask.to(source.device) if mask is not None else None, 0, ids.shape[1], h.dtype)
    for i, run in source.layers():
        h = run(h, cos, sin, am, skip_attn=skip.lacks("attn", i), skip_mlp=skip.lacks("mlp", i))
    out = source.head(h).float()
    return out[mask.bool().to(out.device)] if mask is not None else out.reshape(-1, out.shape[-1])
