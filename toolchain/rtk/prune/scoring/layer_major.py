"""The layer-major engine: one pass over the layers per search step, every candidate batched through each layer.

Every live candidate has its own *activation stream*: the calibration hidden states with that one candidate
removed (on top of what is already removed). A stream starts at its candidate's layer, forked from the base
stream (the current model's hidden states), so the layers before it are computed once (activation reuse).
At layer j the base stream and every stream that started earlier pass through layer j together, in row
chunks of `batch_size` token blocks, so each layer's weights are used once for all of them:

    attention of layer j : base + earlier streams                  (attn.j and layer.j forks skip it)
    MLP of layer j       : base + earlier streams + the attn.j fork (mlp.j and layer.j forks skip it)

Streams live in one tensor of rows ([streams x blocks, seq_len, hidden]). `memory` bounds it: when the
step's streams do not fit, candidates go in groups (in layer order), each group one pass from its first
layer; the base stream's state at the next group's first layer is kept, so it is never recomputed. With
`streams: cpu` every stream waits in (pinned) host memory and each row chunk visits the device for its
layer: one pass per step however many candidates there are, which is what offloaded weights want.
With `teacher_logprobs` (the unpruned model's, `rtk.model.ppl.teacher_logprobs`) the "PPL" is exp(mean KL).
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from rtk.model.ppl import logits_kl, logits_nll, ppl_of

from rtk.errors import RtkError
from rtk.prune.search import Candidate
from rtk.model.layers import LayerSource
from rtk.model.sublayer import sublayer_name


def _size(n: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{int(n)} B"


class LayerMajorScorer:
    def __init__(self, source: LayerSource, blocks: torch.Tensor, batch_size: int = 4,
                 memory_bytes: int = 8 * 10 ** 9, streams: str = "device", progress: bool = True,
                 ppl_only: bool = False, teacher_logprobs: Optional[torch.Tensor] = None):
        self.source = source
        self.blocks = blocks.cpu()
        self.n, self.t = blocks.shape
        self.rows = batch_size
        self.streams_on = streams
        self.progress = progress
        self.device = source.device
        self.dtype = source.dtype
        self.hidden = source.config.hidden_size
        self.n_tokens = int(self.n * (self.t - 1))
        self.stream_bytes = self.n * self.t * self.hidden * torch.empty((), dtype=self.dtype).element_size()
        self.memory_bytes = memory_bytes
        self.capacity = int(memory_bytes // self.stream_bytes)  # streams that fit, base included
        need = 1 if ppl_only else 3
        if streams == "device" and self.capacity < need:
            raise RtkError(
                f"scoring.memory: {_size(memory_bytes)} holds {self.capacity} activation stream(s) of "
                f"{_size(self.stream_bytes)} ({self.n} blocks x {self.t} tokens x {self.hidden} x "
                f"{str(self.dtype).removeprefix('torch.')}); the layer-major engine needs room for {need}: raise "
                "scoring.memory, lower the calibration samples or seq_len, or set scoring.streams: cpu")
        self.targets = self.blocks[:, 1:].to(self.device)
        self.teacher = teacher_logprobs  # [N, T-1, vocab] on the CPU; each row chunk goes to the device in turn
        self.criterion = "ppl" if teacher_logprobs is None else "kl"
        self.cos, self.sin = source.rotary(torch.arange(self.t)[None])
        self.evaluations = 0  # candidate evaluations (incl. plain PPLs)
        self.layer_passes = 0  # stream-layer passes (one stream through one layer)
        self.seconds = 0.0
        self.groups_run = 0

    # ---- storage of the rows ---------------------------------------------------------------------------
    def _alloc(self, n_streams: int) -> torch.Tensor:
        shape = (n_streams * self.n, self.t, self.hidden)
        if self.streams_on == "cpu" and self.device.type != "cpu":
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def _embed_into(self, x: torch.Tensor) -> None:
        for a in range(0, self.n, self.rows):
            e = min(self.n, a + self.rows)
            x[a:e] = self.source.embed(self.blocks[a:e]).to(x.device)

    @torch.no_grad()
    def _apply(self, run, x: torch.Tensor, a: int, b: int, skip_attn: bool, skip_mlp: bool) -> None:
        """Rows [a, b) of x through one phase of a layer, `rows` at a time, in place."""
        for s in range(a, b, self.rows):
            e = min(b, s + self.rows)
            h = x[s:e].to(self.device, non_blocking=True)
            x[s:e].copy_(run(h, self.cos, self.sin, None, skip_attn=skip_attn, skip_mlp=skip_mlp))

    @torch.no_grad()
    def _nll(self, x: torch.Tensor, slot: int) -> float:
        total = 0.0
        base = slot * self.n
        for a in range(0, self.n, self.rows):
            e = min(self.n, a + self.rows)
            h = x[base + a: base + e].to(self.device)
            logits = self.source.head(h[:, :-1])
            if self.teacher is None:
                total += logits_nll(logits, self.targets[a:e])
            else:
                total += logits_kl(logits, self.teacher[a:e].to(self.device))
        self.evaluations += 1
        return total

    def _ppl_of(self, nll: float) -> float:
        return ppl_of(nll, self.n_tokens)

    # ---- the two questions a search asks ---------------------------------------------------------------
    def ppl(self, removed: frozenset[str] = frozenset()) -> float:
        t0 = time.perf_counter()
        x = self._alloc(1)
        self._embed_into(x)
        for j, run in self.source.layers():
            self._layer(run, j, x, 0, self.n, removed, {}, alloc=None)
        p = self._ppl_of(self._nll(x, 0))
        self.seconds += time.perf_counter() - t0
        return p

    def score(self, removed: frozenset[str], cands: list[Candidate], desc: Optional[str] = None) -> dict[str, float]:
        t0 = time.perf_counter()
        order = sorted(cands, key=lambda c: c.layer)  # stable: model order within a layer
        if self.streams_on == "cpu":
            size = max(1, len(order))
        else:
            size = max(1, self.capacity - 2)  # room for the base stream and its kept state
        groups = [order[i: i + size] for i in range(0, len(order), size)]
        n_layers = self.source.n_layers
        total = sum(n_layers - (g[0].layer if k else 0) for k, g in enumerate(groups))
        bar = tqdm(total=total, desc=desc or "scoring", unit="layer", disable=not self.progress, leave=False)
        out: dict[str, float] = {}
        base_state, at = None, 0
        for k, group in enumerate(groups):
            nxt = groups[k + 1][0].layer if k + 1 < len(groups) else None
            got, base_state = self._group(removed, group, base_state, at, nxt, bar)
            out.update(got)
            at = nxt
            self.groups_run += 1
        bar.close()
        self.seconds += time.perf_counter() - t0
        return out

    # ---- one pass ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _group(self, removed, group: list[Candidate], base_state, at: int, keep_at: Optional[int], bar):
        """One pass from layer `at` for a group of candidates: (their PPLs, the base rows entering `keep_at`)."""
        x = self._alloc(1 + len(group))
        if base_state is None:
            self._embed_into(x)
        else:
            x[: self.n].copy_(base_state)
        kept = None
        by_layer: dict[int, list[Candidate]] = {}
        for c in group:
            by_layer.setdefault(c.layer, []).append(c)
        base_until = max(group[-1].layer, keep_at - 1 if keep_at is not None else -1)
        slots: dict[str, int] = {}
        used = [1]  # streams allocated in x (the base is slot 0)

        def alloc() -> int:
            used[0] += 1
            return used[0] - 1

        for j, run in self.source.layers(at):
            if keep_at is not None and j == keep_at:
                kept = x[: self.n].clone()
            lo = 0 if j <= base_until else self.n
            self._layer(run, j, x, lo, used[0] * self.n, removed, {c.name: c for c in by_layer.get(j, [])},
                        alloc, slots)
            bar.update()
        return {name: self._ppl_of(self._nll(x, slot)) for name, slot in slots.items()}, kept

    def _layer(self, run, j: int, x: torch.Tensor, lo: int, hi: int, removed, new: dict, alloc, slots=None) -> None:
        """Layer j over rows [lo, hi) of x, forking the new candidates of layer j from the base rows."""
        n = self.n
        a_name, m_name, l_name = (sublayer_name(k, j) for k in ("attn", "mlp", "layer"))
        attn = a_name not in removed and self._has(j, "attn")
        mlp = m_name not in removed and self._has(j, "mlp")

        def fork(name: str) -> int:
            slot = alloc()
            x[slot * n: (slot + 1) * n].copy_(x[:n])
            slots[name] = slot
            return slot

        self.layer_passes += (hi - lo) // n + len(new)
        a_fork = fork(a_name) if a_name in new else None  # first: it gets the MLP below
        if l_name in new:
            fork(l_name)
        if attn:
            self._apply(run, x, lo, hi, skip_attn=False, skip_mlp=True)
        if m_name in new:
            fork(m_name)
        if mlp:
            end = hi if a_fork is None else (a_fork + 1) * n
            self._apply(run, x, lo, end, skip_attn=True, skip_mlp=False)

    def _has(self, j: int, kind: str) -> bool:
        layer = self.source.model.model.layers[j]
        return (layer.self_attn if kind == "attn" else layer.mlp) is not None
