"""The per-candidate engine: PPL of a model with sublayers skipped at run time, one candidate after another.

Removing a sublayer of layer i leaves layers 0..i-1 unchanged, so while scoring one step the
hidden state entering layer i is computed once and every candidate of layer i starts from it
(`reuse_activations`), instead of re-running the prefix for every candidate.
With `teacher_logprobs` (the unpruned model's, `rtk.model.ppl.teacher_logprobs`) the "PPL" is exp(mean KL).
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from rtk.model.ppl import logits_kl, logits_nll, ppl_of

from rtk.model.modeling_rtk import RtkDeciLMForCausalLM
from rtk.prune.search import Candidate


class ModelScorer:
    """PPL (or exp(mean KL) from `teacher_logprobs`) on fixed token blocks, with any set of sublayers skipped."""

    def __init__(self, model: RtkDeciLMForCausalLM, blocks: torch.Tensor, batch_size: int = 4,
                 reuse_activations: bool = True, progress: bool = True,
                 teacher_logprobs: Optional[torch.Tensor] = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.chunks = [c.to(self.device) for c in blocks.split(batch_size)]
        self.teacher = teacher_logprobs  # [N, T-1, vocab] on the CPU; each chunk's rows go to the device in turn
        self.criterion = "ppl" if teacher_logprobs is None else "kl"
        self.reuse = reuse_activations
        self.progress = progress
        self.evaluations = 0  # candidate evaluations (incl. plain PPLs)
        self.layer_passes = 0  # layer forward passes over all blocks
        self.seconds = 0.0
        self.n_tokens = int(blocks.shape[0] * (blocks.shape[1] - 1))
        t = blocks.shape[1]
        pos = torch.arange(t, device=self.device)[None]
        dtype = next(model.parameters()).dtype
        self.cos, self.sin = model.model.rotary(pos, dtype)

    @torch.no_grad()
    def _embed(self):
        return [self.model.model.embed_tokens(c) for c in self.chunks]

    @torch.no_grad()
    def _advance(self, hs, start, stop, skip):
        self.layer_passes += stop - start
        return [self.model.model.run_layers(h, self.cos, self.sin, None, start, stop, skip) for h in hs]

    @torch.no_grad()
    def _nll(self, hs) -> float:
        total, a = 0.0, 0
        for h, ids in zip(hs, self.chunks):
            logits = self.model.lm_head(self.model.model.norm(h[:, :-1]))
            if self.teacher is None:
                total += logits_nll(logits, ids[:, 1:])
            else:
                total += logits_kl(logits, self.teacher[a: a + len(ids)].to(self.device))
            a += len(ids)
        return total

    def _ppl_from(self, hs, start, skip) -> float:
        nll = self._nll(self._advance(hs, start, len(self.model.model.layers), skip))
        self.evaluations += 1
        return ppl_of(nll, self.n_tokens)

    def ppl(self, removed: frozenset[str] = frozenset()) -> float:
        t0 = time.perf_counter()
        p = self._ppl_from(self._embed(), 0, removed)
        self.seconds += time.perf_counter() - t0
        return p

    def score(self, removed: frozenset[str], cands: list[Candidate], desc: Optional[str] = None) -> dict[str, float]:
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        bar = tqdm(total=len(cands), desc=desc or "scoring", unit="cand", disable=not self.progress, leave=False)
        if not self.reuse:
            for c in cands:
                out[c.name] = self._ppl_from(self._embed(), 0, removed | frozenset(c.parts))
                bar.update()
        else:
            hs, at = self._embed(), 0
            for c in sorted(cands, key=lambda c: c.layer):
                if c.layer > at:
                    hs, at = self._advance(hs, at, c.layer, removed), c.layer
                out[c.name] = self._ppl_from(hs, at, removed | frozenset(c.parts))
                bar.update()
        bar.close()
        self.seconds += time.perf_counter() - t0
        return out
