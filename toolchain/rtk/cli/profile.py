"""`rtk profile MODEL -o OUT`: parse -> BenchConfig -> rtk.bench.profile -> echo."""
from __future__ import annotations

from pathlib import Path

import click

from rtk.bench.config import bench_config, default
from rtk.settings import DTYPE_CHOICES


@click.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/profile.json (a recipe's cost.profile) and OUT/bench.json (every round).")
@click.option("--backend", type=click.Choice(["torch", "vllm"]), default="vllm", show_default=True,
              help="vllm: a local vLLM server per model, `vllm bench serve` output tokens/s; torch: in process.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Interleaved speed rounds (dense, plans, dense, ...); the median ratio is fitted.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: requests in flight.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=default("num_prompts"), show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=default("input_len"), show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=default("output_len"), show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="torch: batch size.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=default("prompt_len"), show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=default("gen_len"), show_default=True)
@click.option("--phase", type=click.Choice(["decode", "prefill"]), default="decode", show_default=True,
              help="torch: which tokens/s is fitted.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto",
              show_default=True, help="auto: bfloat16 on CUDA, float32 on the CPU.")
def profile(model, out, backend, rounds, concurrency, num_prompts, input_len, output_len, batch, prompt_len, gen_len,
            phase, dtype):
    """Measure what each kind of sublayer costs on your engine and machine: a few pruned copies of MODEL timed
    against it, one share of the step time per kind fitted (use OUT/profile.json as a recipe's cost.profile)."""
    from rtk.bench.backends import serving_device
    from rtk.bench.config import model_folders
    from rtk.bench.profile import run_profile
    from rtk.model.device import resolve_dtype

    folder = model_folders([model], backend)[0]
    cfg = bench_config(baseline=str(folder), candidates=[], backend=backend, rounds=rounds, batch_sizes=[batch],
                       prompt_len=prompt_len, gen_len=gen_len, concurrency=[concurrency], num_prompts=num_prompts,
                       input_len=input_len, output_len=output_len,
                       dtype=resolve_dtype(dtype, serving_device() if backend == "vllm" else "cpu", "--dtype"))
    run_profile(str(folder), out, cfg, phase, echo=click.echo)
