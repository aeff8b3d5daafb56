"""`rtk bench`: parse -> rtk.bench.api.bench (BenchConfig in rtk.bench.config holds every default) -> echo."""
from __future__ import annotations

from pathlib import Path

import click

from rtk.bench.config import csv, default
from rtk.errors import RtkError
from rtk.settings import DTYPE_CHOICES


def _ints(field: str, value: str) -> list[int]:
    """'1,8' -> [1, 8]; the values themselves are BenchConfig's to check (with every other setting)."""
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise RtkError(f"{field}: expected integers separated by commas, got '{value}'") from None


@click.command()
@click.option("--baseline", required=True, help="Original model folder (or embedded:smollm2 / a .gguf file).")
@click.option("--candidate", "candidates", required=True, multiple=True,
              help="Pruned model folder (repeatable; also embedded:smollm2 / a .gguf file).")
@click.option("--backend", type=click.Choice(["torch", "onnx", "vllm", "openai"]), default="torch",
              show_default=True, help="torch/onnx: in process; vllm: start a local vLLM server per model; "
              "openai: running servers given by --endpoint.")
@click.option("--serve", type=click.Choice(["vllm"]), default=None, help="Same as --backend vllm.")
@click.option("--endpoint", "endpoints", multiple=True,
              help="Base URL of a running OpenAI-compatible server, one per model (baseline first).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for bench.json, bench.md, plots, lm-eval and vLLM benchmark results.")
@click.option("--tasks", default=None,
              help="lm-eval zero-shot tasks: piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande | all | none "
                   "(default: all; none with --backend onnx).")
@click.option("--limit", type=int, default=None, help="First N documents of each task.")
@click.option("--ppl-samples", type=int, default=default("ppl_samples"), show_default=True,
              help="WikiText-2 test blocks for PPL (the evaluation rtk prune reports by default).")
@click.option("--ppl-seq-len", type=int, default=default("ppl_seq_len"), show_default=True, help="Tokens per block.")
@click.option("--rounds", type=int, default=default("rounds"), show_default=True,
              help="Interleaved speed rounds (baseline, candidates, baseline, ...).")
@click.option("--batch-sizes", default=csv(default("batch_sizes")), show_default=True, help="In-process speed: batch sizes.")
@click.option("--prompt-len", type=int, default=default("prompt_len"), show_default=True)
@click.option("--gen-len", type=int, default=default("gen_len"), show_default=True)
@click.option("--repeats", type=int, default=default("repeats"), show_default=True)
@click.option("--concurrency", default=csv(default("concurrency")), show_default=True,
              help="Served speed: vllm bench serve --max-concurrency levels.")
@click.option("--num-prompts", type=int, default=default("num_prompts"), show_default=True)
@click.option("--input-len", type=int, default=default("input_len"), show_default=True)
@click.option("--output-len", type=int, default=default("output_len"), show_default=True)
@click.option("--chat", is_flag=True, help="Served speed as chat requests (/v1/chat/completions): each prompt a user "
              "message in the model's chat template. In process speed depends only on --prompt-len: refused there.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto",
              show_default=True, help="auto: bfloat16 on CUDA, float32 on the CPU.")
@click.option("--sweep", type=click.Choice(["guidellm", "rates"]), default=None,
              help="Also sweep the load (served backends): guidellm = GuideLLM --profile sweep; rates = vllm bench "
                   "serve at several request rates. One throughput-vs-latency plot for all models.")
@click.option("--sweep-seconds", type=int, default=default("sweep_seconds"), show_default=True,
              help="Duration of each sweep point.")
@click.option("--card", "card", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A --candidate folder whose model card (README.md) gets this run's Evaluation and Inference "
                   "performance sections.")
@click.option("--skip", type=click.Choice(["quality", "speed"]), multiple=True, help="Skip a part.")
@click.option("--keep-servers/--restart-servers", default=None,
              help="vllm: keep one server per model up across rounds (default: when memory allows; on CUDA they "
                   "split --gpu-memory-utilization).")
@click.option("--quantization", type=click.Choice(["fp8"]), default=None,
              help="vllm: serve every --candidate with vLLM's online quantization (FP8 weights quantized as vLLM "
                   "loads them; GPUs); the baseline is served as it is.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
def bench(baseline, candidates, backend, serve, endpoints, out, tasks, limit, ppl_samples, ppl_seq_len, rounds,
          batch_sizes, prompt_len, gen_len, repeats, concurrency, num_prompts, input_len, output_len, chat, dtype,
          sweep, sweep_seconds, card, skip, keep_servers, quantization, threads):
    """Measure the original and pruned models the same way: WikiText-2 PPL, zero-shot accuracy by lm-eval-harness
    and speed (served: vLLM's benchmark), interleaved over rounds; write OUT/{bench.json, bench.md, *.png}."""
    from rtk.bench.api import bench as run

    if threads:
        import torch

        torch.set_num_threads(threads)
    run(baseline, list(candidates), out, backend="vllm" if serve else backend, endpoints=list(endpoints), tasks=tasks,
        dtype=dtype, card=card, echo=click.echo, limit=limit, ppl_samples=ppl_samples, ppl_seq_len=ppl_seq_len,
        rounds=rounds, batch_sizes=_ints("--batch-sizes", batch_sizes), prompt_len=prompt_len, gen_len=gen_len,
        repeats=repeats, concurrency=_ints("--concurrency", concurrency), num_prompts=num_prompts,
        input_len=input_len, output_len=output_len, chat=chat, keep_servers=keep_servers, quantization=quantization,
        quality="quality" not in skip, speed="speed" not in skip, sweep=sweep, sweep_seconds=sweep_seconds)
