"""`rtk ablate --bench`: every variant's exported model measured the same way as `rtk bench`.

Per model folder:

- **zero-shot** accuracy on the lm-eval-style tasks (first ``limit`` documents of each), run in this
  process by rtk's torch model class in float32 on the exported folder (served vLLM log-probs equal these
  to 1e-4, see tests/test_vllm_*.py), and their average;
- **served speed**: the folder is served by a local vLLM OpenAI-compatible server and loaded with the
  workloads below, interleaved with the dense model's server (kept up for the whole run) round by round:
  dense, candidate, dense, candidate ... with the same token-id prompts, so each ratio is taken within
  one round and slow drift of a shared machine cancels.

Workloads (random token-id prompts, ``ignore_eos``, as ``vllm bench serve --dataset-name random``):
``short`` = 8 prompts of 128 tokens, 32 generated, one request at a time (decode-bound);
``kv-heavy`` = 4 prompts of 1024 tokens, 32 generated, 4 in flight (long contexts: KV cache and
attention work dominate, and prefill shows in TTFT).

Speedups are dense / candidate for latencies (TPOT, TTFT) and candidate / dense for output tokens/s.
"""
from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import RtkError
from ..bench.metrics import ratio_stats
from ..bench.tasks import TASKS, load_task, loglikelihoods, score


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    concurrency: int


WORKLOADS = (Workload("short", 8, 128, 32, 1), Workload("kv-heavy", 4, 1024, 32, 4))
# the per-request numbers kept for each round (vllm bench serve names)
KEPT = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "output_throughput",
        "request_throughput", "completed", "failed", "duration_s")


@dataclass
class AblationBenchConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    limit: Optional[int] = 50
    rounds: int = 2
    workloads: tuple[Workload, ...] = WORKLOADS
    dtype: str = "float32"
    seed: int = 2000

    def describe(self) -> dict:
        d = asdict(self)
        d["workloads"] = [asdict(w) for w in self.workloads]
        return d


def zero_shot(token_logprobs, tokenizer, tasks: list[str], limit: Optional[int]) -> dict:
    """Per task acc / acc_norm (rtk.bench.tasks.score) and their plain averages over tasks."""
    per = {}
    for t in tasks:
        docs = load_task(t, limit)
        per[t] = score(docs, loglikelihoods(token_logprobs, tokenizer, docs))
    avg = {k: statistics.fmean(per[t][k] for t in tasks) for k in ("acc", "acc_norm")} if tasks else {}
    # standard error of the average of independent task means
    se = math.sqrt(sum(per[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks) if tasks else math.nan
    return {"tasks": per, "avg_acc": avg.get("acc", math.nan), "avg_acc_norm": avg.get("acc_norm", math.nan),
            "avg_acc_stderr": se, "docs": sum(per[t]["n"] for t in tasks)}


def speedups(base_rounds: list[dict], cand_rounds: list[dict], workloads) -> dict:
    """Per workload, candidate vs dense within each round: tokens/s, TPOT and TTFT speedups
    (rtk.bench.metrics.ratio_stats: per-round values, median, min, max)."""
    out = {}
    for w in workloads:
        b = [r[w.name] for r in base_rounds]
        c = [r[w.name] for r in cand_rounds]
        out[w.name] = {
            "throughput": ratio_stats([x["output_throughput"] for x in b], [x["output_throughput"] for x in c]),
            "tpot": ratio_stats([x["median_tpot_ms"] for x in c], [x["median_tpot_ms"] for x in b]),
            "ttft": ratio_stats([x["median_ttft_ms"] for x in c], [x["median_ttft_ms"] for x in b]),
        }
    return out


def _default_open(folder: str, log_dir: Path, dtype: str):
    from ..bench.backends import VLLMBackend

    return VLLMBackend(folder, log_dir=log_dir, dtype=dtype)


def _default_quality(folder: str, dtype: str):
    from ..bench.backends import TorchBackend

    return TorchBackend(folder, dtype)


class AblationBench:
    """Measures model folders one after another against the dense model, whose server stays up.

    ``open_served(folder, log_dir, dtype)`` returns a served backend (``serve_load``, ``vocab_size``,
    ``tokenizer``, ``close``); ``open_quality(folder, dtype)`` one with ``token_logprobs`` and ``tokenizer``.
    Both default to rtk.bench.backends (vLLM server; rtk's torch class)."""

    def __init__(self, cfg: AblationBenchConfig, log_dir: Path, echo: Callable[[str], None] = print,
                 open_served: Callable = _default_open, open_quality: Callable = _default_quality):
        self.cfg, self.log_dir, self.echo = cfg, Path(log_dir), echo
        self.open_served, self.open_quality = open_served, open_quality
        self.dense_dir: Optional[str] = None
        self._dense = None

    def describe(self) -> dict:
        return {**self.cfg.describe(), "quality_backend": "torch (rtk model class, in process)",
                "speed_backend": "vLLM OpenAI-compatible server (prefix caching off), /v1/completions streamed"}

    def quality(self, folder: str) -> dict:
        t0 = time.perf_counter()
        b = self.open_quality(str(folder), self.cfg.dtype)
        try:
            q = zero_shot(b.token_logprobs, b.tokenizer, self.cfg.tasks, self.cfg.limit)
        finally:
            b.close()
        q["seconds"] = round(time.perf_counter() - t0, 1)
        return q

    def _prompts(self, backend, w: Workload, rnd: int) -> list[list[int]]:
        from ..bench.backends import random_prompts

        tok = backend.tokenizer
        avoid = [t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None]
        return random_prompts(backend.vocab_size, w.num_prompts, w.input_len,
                              seed=self.cfg.seed + 100 * rnd + w.input_len, avoid=avoid)

    def _load(self, backend, rnd: int) -> dict:
        out = {}
        for w in self.cfg.workloads:
            m = backend.serve_load(self._prompts(backend, w, rnd), w.output_len, w.concurrency)
            if m["failed"]:
                raise RtkError(f"--bench: {m['failed']} of {w.num_prompts} requests of workload {w.name} failed")
            out[w.name] = {k: m[k] for k in KEPT}
        return out

    def _start(self, folder: str):
        """Start the dense server (once) and the candidate's; returns (candidate, seconds)."""
        t0 = time.perf_counter()
        if self._dense is None:
            self.echo(f"rtk bench: serving the dense model {self.dense_dir}")
            self._dense = self.open_served(self.dense_dir, self.log_dir, self.cfg.dtype)
        return self.open_served(str(folder), self.log_dir, self.cfg.dtype), time.perf_counter() - t0

    def _rounds(self, cand) -> dict:
        base_r, cand_r = [], []
        try:
            for rnd in range(self.cfg.rounds):
                base_r.append(self._load(self._dense, rnd))
                cand_r.append(self._load(cand, rnd))
        finally:
            cand.close()
        return {"dense_rounds": base_r, "rounds": cand_r, "speedup": speedups(base_r, cand_r, self.cfg.workloads)}

    def measure(self, folder: str, dense: bool = False) -> dict:
        """Zero-shot for every folder; served speed vs dense for the others (the dense row is 1 by definition).
        The servers start in a thread while zero-shot runs here; the speed rounds run after both."""
        if dense:
            self.dense_dir = str(folder)
            return {"zero_shot": self.quality(folder)}
        if self.dense_dir is None:
            raise RtkError("--bench: the dense model folder is not known (measure it first)")
        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(self._start, str(folder))
            try:
                q = self.quality(folder)
            except BaseException:
                try:
                    fut.result()[0].close()
                except Exception:  # noqa: BLE001 - the start failed too; the first error is the one to report
                    pass
                raise
            cand, started = fut.result()
        served = self._rounds(cand)
        served["server_start_s"] = round(started, 1)
        return {"zero_shot": q, "served": served}

    def close(self) -> None:
        if self._dense is not None:
            self._dense.close()
            self._dense = None
