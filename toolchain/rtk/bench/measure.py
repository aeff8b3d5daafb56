"""One model's numbers in a bench run: quality (WikiText-2 PPL, lm-eval zero-shot) and one round of speed
(in-process timings, or `vllm bench serve` against a server)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rtk.bench.backends import ppl
from rtk.bench.config import BenchConfig


def lm_eval_spec(b, cfg: BenchConfig, taskset):
    """lm-eval's `hf` model on the folder (in-process backends) or `local-completions` on the server."""
    from rtk.bench.accuracy import harness

    if b.serving:
        return harness.served_run(b.url, b.model_name, b.path, taskset, cfg.limit)
    import torch

    return harness.hf_run(b.path, taskset, cfg.limit, dtype=cfg.dtype,
                          device="cuda" if torch.cuda.is_available() else "cpu", batch_size=cfg.lm_eval_batch_size)


def measure_quality(b, cfg: BenchConfig, echo, taskset=None, work: Optional[Path] = None, label: str = "") -> dict:
    from rtk.data import token_blocks

    blocks, info = token_blocks(b.tokenizer, cfg.evaluation(), "--ppl")
    out = {"wikitext2": {**ppl(b, blocks), **{k: info[k] for k in ("file", "text", "split", "samples", "seq_len")}}}
    echo(f"rtk bench:   WikiText-2 test PPL {out['wikitext2']['ppl']:.3f}")
    out["tasks"] = {}
    if cfg.tasks:
        from rtk.bench.accuracy import harness

        run = harness.run(lm_eval_spec(b, cfg, taskset), work, label, echo)
        out["tasks"] = run.pop("tasks")
        out["per_doc"] = run.pop("per_doc")
        out["lm_eval"] = {**run, "results_file": str(Path(run["results_file"]).relative_to(work)),
                          "include_path": taskset.include_path, "sources": taskset.sources}
    return out


def measure_speed(b, cfg: BenchConfig, rnd: int, work: Optional[Path] = None, label: str = "") -> dict:
    if b.serving:
        res = {}
        for c in cfg.concurrency:
            f = Path(work) / "vllm_bench" / f"{label}-round{rnd + 1}-c{c}.json"
            r = b.serve_load(cfg.num_prompts, cfg.input_len, cfg.output_len, c, seed=1000 + rnd, result_file=f,
                             log=Path(work) / "logs" / f"vllm_bench-{label}.log", chat=cfg.chat)
            r["result_file"] = str(f.relative_to(work))
            res[f"c{c}"] = r
        return res
    return {f"b{n}": b.speed(n, cfg.prompt_len, cfg.gen_len, cfg.repeats, seed=rnd) for n in cfg.batch_sizes}
