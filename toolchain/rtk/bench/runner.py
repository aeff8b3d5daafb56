"""`rtk bench`: measure a baseline and candidates the same way, interleaved round by round.

Quality (WikiText-2 PPL, zero-shot accuracy) is deterministic and measured once per model;
speed is measured in `rounds`, each round running baseline then every candidate (A B A B ...),
and every ratio is computed within a round, so slow drift of a shared machine cancels.
With served backends one server per model stays up across rounds when memory allows.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import RtkError
from ..cost import model_params
from . import cost
from .backends import open_backend, ppl, random_prompts
from .endpoint import served_model
from .metrics import ratio_stats
from .tasks import load_task, loglikelihoods, score

SERVER_GIB = 5.0  # a vLLM-CPU server with a 1 GiB KV cache and a small model


@dataclass
class BenchConfig:
    baseline: str
    candidates: list[str]
    backend: str = "torch"
    endpoints: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    ppl_samples: int = 16
    ppl_seq_len: int = 256
    rounds: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    gen_len: int = 32
    repeats: int = 3
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    num_prompts: int = 8
    input_len: int = 128
    output_len: int = 32
    dtype: str = "float32"
    keep_servers: Optional[bool] = None  # None: decide from free memory
    quality: bool = True
    speed: bool = True


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return math.inf


class Backends:
    """Opens a backend per model on demand; keeps all open, or only one at a time."""

    def __init__(self, cfg: BenchConfig, models: list[str], log_dir: Path, echo):
        self.cfg, self.models, self.log_dir, self.echo = cfg, models, log_dir, echo
        self.open: dict[int, object] = {}
        keep = cfg.keep_servers
        if keep is None:
            keep = cfg.backend != "vllm" or mem_available_gib() > SERVER_GIB * len(models) + 2
        self.keep = keep

    def get(self, i: int):
        if i in self.open:
            return self.open[i]
        if not self.keep:
            self.close()
        url = self.cfg.endpoints[i] if self.cfg.endpoints else None
        t0 = time.perf_counter()
        self.open[i] = open_backend(self.cfg.backend, self.models[i], url, self.log_dir, self.cfg.dtype)
        self.echo(f"rtk bench: {self.cfg.backend} backend ready for {self.models[i]} "
                  f"({time.perf_counter() - t0:.0f} s)")
        return self.open[i]

    def close(self) -> None:
        while self.open:
            _, b = self.open.popitem()
            b.close()


def measure_quality(b, cfg: BenchConfig, echo) -> dict:
    from ..data import token_blocks
    from ..recipe import DataSpec

    spec = DataSpec(source="wikitext2", split="test", samples=cfg.ppl_samples, seq_len=cfg.ppl_seq_len)
    blocks, info = token_blocks(b.tokenizer, spec, "--ppl")
    out = {"wikitext2": {**ppl(b, blocks), **{k: info[k] for k in ("file", "split", "samples", "seq_len")}}}
    echo(f"rtk bench:   WikiText-2 test PPL {out['wikitext2']['ppl']:.3f}")
    out["tasks"] = {}
    for t in cfg.tasks:
        docs = load_task(t, cfg.limit)
        out["tasks"][t] = score(docs, loglikelihoods(b.token_logprobs, b.tokenizer, docs))
        echo(f"rtk bench:   {t}: acc {out['tasks'][t]['acc']:.3f} acc_norm {out['tasks'][t]['acc_norm']:.3f} "
             f"(n={out['tasks'][t]['n']})")
    return out


def measure_speed(b, cfg: BenchConfig, rnd: int) -> dict:
    if b.serving:
        prompts = random_prompts(b.vocab_size, cfg.num_prompts, cfg.input_len, seed=1000 + rnd,
                                 avoid=[t for t in (b.tokenizer.bos_token_id, b.tokenizer.eos_token_id)
                                        if t is not None])
        return {f"c{c}": b.serve_load(prompts, cfg.output_len, c) for c in cfg.concurrency}
    return {f"b{n}": b.speed(n, cfg.prompt_len, cfg.gen_len, cfg.repeats, seed=rnd) for n in cfg.batch_sizes}


# (path in a speed record, higher is better)
def speed_keys(cfg: BenchConfig, serving: bool) -> list[tuple[str, bool]]:
    if serving:
        keys = []
        for c in cfg.concurrency:
            for name, hib in (("median_ttft_ms", False), ("median_tpot_ms", False), ("median_itl_ms", False),
                              ("median_e2el_ms", False), ("p99_tpot_ms", False), ("output_throughput", True),
                              ("request_throughput", True)):
                keys.append((f"c{c}.{name}", hib))
        return keys
    return [(f"b{n}.{p}.tokens_per_s", True) for n in cfg.batch_sizes for p in ("prefill", "decode")]


def _get(rec: dict, path: str):
    for k in path.split("."):
        rec = rec[k]
    return rec


def ratios(result: dict, cfg: BenchConfig) -> dict:
    base = result["models"][0]
    serving = result["serving"]
    out = {}
    for j, cand in enumerate(result["models"][1:], start=1):
        r = {}
        if cand.get("quality") and base.get("quality"):
            q, qb = cand["quality"], base["quality"]
            r["wikitext2.ppl"] = {"ratio": q["wikitext2"]["ppl"] / qb["wikitext2"]["ppl"], "higher_is_better": False}
            for t, s in q["tasks"].items():
                sb = qb["tasks"][t]
                for k in ("acc", "acc_norm"):
                    se = math.hypot(s[f"{k}_stderr"], sb[f"{k}_stderr"])
                    r[f"{t}.{k}"] = {"ratio": s[k] / sb[k] if sb[k] else math.nan, "diff": s[k] - sb[k],
                                     "diff_stderr": se, "higher_is_better": True}
        if cand.get("speed"):
            for key, hib in speed_keys(cfg, serving):
                st = ratio_stats([_get(x, key) for x in base["speed"]], [_get(x, key) for x in cand["speed"]])
                r[key] = {**st, "higher_is_better": hib}
        out[cand["label"]] = r
    return out


def run_bench(cfg: BenchConfig, out_dir: Path, echo: Callable[[str], None] = print) -> dict:
    models = [cfg.baseline, *cfg.candidates]
    if cfg.endpoints and len(cfg.endpoints) != len(models):
        raise RtkError(f"--endpoint: {len(cfg.endpoints)} given for {len(models)} models "
                       "(one per model: baseline first, then candidates in order)")
    if cfg.backend == "openai":
        if not cfg.endpoints:
            raise RtkError("--backend openai needs one --endpoint URL per model (baseline first)")
        for url in cfg.endpoints:  # fail before any work when one is dead or wrong
            served_model(url)
    if cfg.backend == "vllm":  # e.g. a folder that needs rtk's vLLM plugin: fail before any server starts
        from ..serve import preflight

        for m in models:
            preflight(m)
    labels = ["baseline"] + [f"candidate{j}" for j in range(1, len(models))]
    shapes = [cost.read_config(m) for m in models]
    result = {"config": asdict(cfg), "serving": cfg.backend in ("vllm", "openai"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "models": [{"label": lab, "path": str(m), "params": model_params(s) if s else None, "speed": []}
                         for lab, m, s in zip(labels, models, shapes)]}
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Backends(cfg, models, log_dir, echo)
    try:
        if cfg.quality:
            for i, m in enumerate(models):
                echo(f"rtk bench: quality of {labels[i]} ({m})")
                result["models"][i]["quality"] = measure_quality(pool.get(i), cfg, echo)
        if cfg.speed:
            for rnd in range(cfg.rounds):
                for i, m in enumerate(models):
                    echo(f"rtk bench: speed round {rnd + 1}/{cfg.rounds}: {labels[i]}")
                    result["models"][i]["speed"].append(measure_speed(pool.get(i), cfg, rnd))
    finally:
        pool.close()
    result["ratios"] = ratios(result, cfg)
    ideal = {}
    for j in range(1, len(models)):
        if shapes[0] is not None and shapes[j] is not None:
            p, o = (cfg.input_len, cfg.output_len) if result["serving"] else (cfg.prompt_len, cfg.gen_len)
            batches = cfg.concurrency if result["serving"] else cfg.batch_sizes
            ideal[labels[j]] = {f"batch{n}": cost.ideal(shapes[0], shapes[j], p, o, n,
                                                        cost.DTYPE_BYTES.get(cfg.dtype, 4)) for n in batches}
    result["ideal"] = ideal
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result
