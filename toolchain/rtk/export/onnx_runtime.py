"""ONNX Runtime backend for a folder written by `rtk export --format onnx`: perplexity and greedy
generation with the KV cache.

    lm = OrtLM("out/onnx")                 # CUDAExecutionProvider when available, else CPU
    lm.token_logprobs([[1, 2, 3], [4, 5]]) # log p(token_t | tokens_<t), t >= 1
    lm.cached_logprobs([1, 2, 3, 4], 2)    # the same for t >= 2, decoded through the KV cache
    lm.ppl(blocks)                         # blocks: LongTensor [N, T]
    lm.greedy([1, 2, 3], 16)               # exactly 16 new token ids (no stop at EOS)
    lm.greedy_batch([[1, 2], [3, 4]], 16)  # equal-length prompts decoded as one batch
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rtk.errors import RtkError
from rtk.model.ppl import logprobs_ppl

GRAPH = "model.onnx"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def default_provider() -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"


def session_providers(provider: str) -> list[str]:
    """The providers of a session: CUDA with the CPU as fallback for the ops it lacks (ONNX Runtime's advice)."""
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


class OrtLM:
    """A causal LM served by one ONNX Runtime session over the exported KV-cache graph."""

    def __init__(self, folder, provider: Optional[str] = None, threads: Optional[int] = None):
        import onnxruntime as ort

        path = Path(folder) / GRAPH
        if not path.is_file():
            raise RtkError(f"onnx: {path} not found (export with `rtk export MODEL --format onnx -o DIR`)")
        provider = provider or default_provider()
        if provider not in ort.get_available_providers():
            raise RtkError(f"onnx: provider '{provider}' is not available "
                           f"(available: {', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.provider = provider
        self.session = ort.InferenceSession(str(path), opts, providers=session_providers(provider))
        past = {}
        for inp in self.session.get_inputs():
            m = _PAST.match(inp.name)
            if m:
                past[(int(m.group(1)), m.group(2))] = inp
        self.n_attn = len(past) // 2
        if sorted(past) != [(i, p) for i in range(self.n_attn) for p in ("key", "value")]:
            raise RtkError(f"onnx: {path}: past key/value inputs are not numbered 0..n-1")
        self.past_names = [past[(i, p)].name for i in range(self.n_attn) for p in ("key", "value")]
        shape = past[(0, "key")].shape if self.n_attn else [None, 0, None, 0]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list) -> list[np.ndarray]:
        """One call of the graph: returns [logits, *presents]."""
        feed = {"input_ids": np.ascontiguousarray(ids, np.int64),
                "attention_mask": np.ascontiguousarray(mask, np.int64),
                "position_ids": np.ascontiguousarray(pos, np.int64)}
        feed.update(zip(self.past_names, past))
        return self.session.run(self.output_names, feed)

    def token_logprobs(self, seqs: list[list[int]], batch_size: int = 4) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) for t >= 1 of every sequence (batched, right-padded: with a causal
        mask, padding after a sequence cannot change its scores)."""
        out: list[list[float]] = []
        for start in range(0, len(seqs), batch_size):
            chunk = [list(map(int, s)) for s in seqs[start:start + batch_size]]
            t = max(len(s) for s in chunk)
            ids = np.zeros((len(chunk), t), np.int64)
            mask = np.zeros((len(chunk), t), np.int64)
            for r, s in enumerate(chunk):
                ids[r, :len(s)], mask[r, :len(s)] = s, 1
            pos = np.broadcast_to(np.arange(t, dtype=np.int64), (len(chunk), t))
            logits = torch.from_numpy(self.run(ids, mask, pos, self.empty_past(len(chunk)))[0])
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, torch.from_numpy(ids[:, 1:])[..., None])[..., 0]
            out += [picked[r, :len(s) - 1].tolist() for r, s in enumerate(chunk)]
        return out

    def cached_logprobs(self, seq: list[int], prefill: int) -> list[float]:
        """log p(seq[t] | seq[:t]) for t >= prefill, as generation computes them: one call over seq[:prefill], then
        one call per token with the KV cache (teacher-forced: the next input is seq[t], not the model's choice)."""
        if not 0 < prefill < len(seq):
            raise RtkError(f"cached_logprobs: prefill {prefill} must leave at least one of {len(seq)} tokens")
        ids, past, out = np.asarray([seq[:prefill]], np.int64), self.empty_past(1), []
        for t in range(prefill, len(seq)):
            pos = np.arange(t - ids.shape[1], t, dtype=np.int64)[None]
            logits, *past = self.run(ids, np.ones((1, t), np.int64), pos, past)
            out.append(float(torch.log_softmax(torch.from_numpy(logits[0, -1]).float(), -1)[seq[t]]))
            ids = np.asarray([[seq[t]]], np.int64)
        return out

    def ppl(self, blocks: torch.Tensor, batch_size: int = 4) -> float:
        """exp(mean NLL) over every predicted token of the [N, T] blocks (as rtk's torch scorer)."""
        lps = self.token_logprobs(blocks.tolist(), batch_size=batch_size)
        return logprobs_ppl(lps)["ppl"]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding with the KV cache: prefill once, then one token per call."""
        return self.greedy_batch([prompt_ids], max_new_tokens)[0]

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding of equal-length prompts as one batch: one prefill call for all of them, then one
        call per step for the whole batch (no padding needed)."""
        if not prompts or not prompts[0]:
            raise RtkError("greedy: the prompt is empty")
        if len({len(p) for p in prompts}) != 1:
            raise RtkError("greedy_batch: prompts must have equal lengths")
        ids = np.asarray(prompts, np.int64)
        b, n = ids.shape
        past, new = self.empty_past(b), []
        for _ in range(max_new_tokens):
            pos = np.broadcast_to(np.arange(n - ids.shape[1], n, dtype=np.int64), (b, ids.shape[1]))
            logits, *past = self.run(ids, np.ones((b, n), np.int64), pos, past)
            new.append(logits[:, -1].argmax(-1).astype(np.int64))
            ids = new[-1][:, None]
            n += 1
        return np.stack(new, 1).tolist() if new else [[] for _ in prompts]


__all__ = ["OrtLM", "default_provider", "session_providers"]
