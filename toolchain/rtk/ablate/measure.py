"""`rtk ablate --bench`: every variant's exported model measured the same way as `rtk bench`.

Per model folder:

- **zero-shot** accuracy by lm-eval-harness (its `hf` model on the exported folder, first ``limit``
  documents of each task; rtk.bench.accuracy, the same path as `rtk bench`), and the average over tasks;
- **served speed**: the folder is served by a local vLLM OpenAI-compatible server and loaded with the
  workloads below, interleaved with the dense model's server (kept up for the whole run) round by round:
  dense, candidate, dense, candidate ... with the same token-id prompts, so each ratio is taken within
  one round and slow drift of a shared machine cancels.

Workloads, each one run of vLLM's own benchmark (``vllm bench serve --dataset-name random``, ``ignore_eos``):
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

from rtk.errors import RtkError
from rtk.bench.metrics import ratio_stats
from rtk.bench.accuracy.tasks import TASKS


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
        "request_throughput", "completed", "failed", "duration")


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


def zero_shot(folder: str, tasks: list[str], limit: Optional[int], dtype: str, work: Path, label: str) -> dict:
    """Per task lm-eval's acc / acc_norm (rtk.bench.accuracy.harness, `hf` model on the folder), averaged, and
    the per-document scores (per_doc) that pair this folder with the dense one (rtk.paired)."""
    if not tasks:  # --bench-tasks none: served speed only, no lm-eval run
        return {**average({}, []), "lm_eval_command": None}
    from rtk.bench.accuracy import harness
    from rtk.bench.accuracy.tasks import prepare

    run = harness.run(harness.hf_run(folder, prepare(tasks), limit, dtype=dtype), work, label, echo=lambda s: None)
    return {**average(run["tasks"], tasks), "per_doc": run["per_doc"], "lm_eval_command": run["command"]}


def average(per: dict, tasks: list[str]) -> dict:
    """Plain averages over tasks (acc_norm over the tasks that define it) and the standard error of the
    average acc (independent task means)."""
    norm = [t for t in tasks if "acc_norm" in per[t]]
    se = math.sqrt(sum(per[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks) if tasks else math.nan
    return {"tasks": per, "avg_acc": statistics.fmean(per[t]["acc"] for t in tasks) if tasks else math.nan,
            "avg_acc_norm": statistics.fmean(per[t]["acc_norm"] for t in norm) if norm else math.nan,
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
    from rtk.bench.backends import VLLMBackend

    return VLLMBackend(folder, log_dir=log_dir, dtype=dtype)


class AblationBench:
    """Measures model folders one after another against the dense model, whose server stays up.

    ``open_served(folder, log_dir, dtype)`` returns a served backend (``serve_load``, ``close``); it defaults
    to rtk.bench.backends.VLLMBackend (a vLLM server)."""

    def __init__(self, cfg: AblationBenchConfig, log_dir: Path, echo: Callable[[str], None] = print,
                 open_served: Callable = _default_open):
        self.cfg, self.log_dir, self.echo = cfg, Path(log_dir), echo
        self.open_served = open_served
        self.dense_dir: Optional[str] = None
        self._dense = None

    def describe(self) -> dict:
        return {**self.cfg.describe(), "quality_backend": "lm-eval-harness, hf model on the folder",
                "speed_backend": "vLLM OpenAI-compatible server (prefix caching off), vllm bench serve"}

    def quality(self, folder: str) -> dict:
        t0 = time.perf_counter()
        q = zero_shot(str(folder), self.cfg.tasks, self.cfg.limit, self.cfg.dtype, self.log_dir,
                      "dense" if str(folder) == self.dense_dir else Path(folder).name)
        q["seconds"] = round(time.perf_counter() - t0, 1)
        return q

    def _load(self, backend, rnd: int, name: str) -> dict:
        out = {}
        for w in self.cfg.workloads:
            f = self.log_dir / "vllm_bench" / f"{name}-round{rnd + 1}-{w.name}.json"
            m = backend.serve_load(w.num_prompts, w.input_len, w.output_len, w.concurrency,
                                   seed=self.cfg.seed + 100 * rnd + w.input_len, result_file=f)
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

    def _rounds(self, cand, name: str) -> dict:
        base_r, cand_r = [], []
        try:
            for rnd in range(self.cfg.rounds):
                base_r.append(self._load(self._dense, rnd, f"dense-for-{name}"))
                cand_r.append(self._load(cand, rnd, name))
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
        served = self._rounds(cand, Path(folder).name)
        served["server_start_s"] = round(started, 1)
        return {"zero_shot": q, "served": served}

    def close(self) -> None:
        if self._dense is not None:
            self._dense.close()
            self._dense = None
