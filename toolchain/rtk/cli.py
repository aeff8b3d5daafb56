"""rtk command line: thin Click commands; errors are one line and exit != 0."""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import __version__
from .errors import RtkError


@click.group()
@click.version_option(__version__, prog_name="rtk")
def main():
    """rtk: remove whole attention / MLP sublayers by their measured impact on perplexity,
    and ship the smaller model to vLLM and ONNX Runtime."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/<recipe name>).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many search steps; rerunning the same command continues.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prune(recipe: Path, out: Path | None, max_steps: int | None, threads: int | None, quiet: bool):
    """Score every sublayer, search which to remove, and write OUT/{plan.json, model/, report.md}."""
    from .recipe import load_recipe

    rec = load_recipe(recipe)
    out = out or Path("runs") / recipe.stem
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .prune import SearchPaused, run_prune

    try:
        plan = run_prune(rec, out, progress=not quiet, echo=click.echo, max_steps=max_steps)
    except SearchPaused as exc:
        click.echo(str(exc))
        return
    ev = plan["eval"]
    click.echo(
        f"rtk: removed {len(plan['removed'])} sublayers, {plan['params_removed']:,} of {plan['params_total']:,} "
        f"parameters ({plan['params_removed_fraction']:.1%})\n"
        f"rtk: {ev['file']} [{ev['split']}] PPL ({ev['samples']}x{ev['seq_len']} tokens, {rec.dtype}): "
        f"{ev['ppl_base']:.3f} before -> {ev['ppl_final']:.3f} after\n"
        f"rtk: wrote {out}/plan.json, {out}/model/, {out}/report.md"
    )


# ---- rtk bench -----------------------------------------------------------------------------------
def _ints(field: str, value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise RtkError(f"{field}: expected positive integers separated by commas, got '{value}'")
    return out


@main.command()
@click.option("--baseline", required=True, type=click.Path(path_type=Path), help="Original model folder.")
@click.option("--candidate", "candidates", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Pruned model folder (repeatable).")
@click.option("--backend", type=click.Choice(["torch", "onnx", "vllm", "openai"]), default="torch",
              show_default=True, help="torch/onnx: in process; vllm: start a local vLLM server per model; "
              "openai: running servers given by --endpoint.")
@click.option("--serve", type=click.Choice(["vllm"]), default=None, help="Same as --backend vllm.")
@click.option("--endpoint", "endpoints", multiple=True,
              help="Base URL of a running OpenAI-compatible server, one per model (baseline first).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for bench.json, bench.md and plots.")
@click.option("--tasks", default="all", show_default=True,
              help="Zero-shot tasks: piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande | all | none.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N records of each task.")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="WikiText-2 test blocks for PPL.")
@click.option("--ppl-seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per block.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved speed rounds (baseline, candidates, baseline, ...).")
@click.option("--batch-sizes", default="1,8", show_default=True, help="In-process speed: batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--concurrency", default="1,4", show_default=True, help="Served speed: concurrency levels.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--skip", type=click.Choice(["quality", "speed"]), multiple=True, help="Skip a part.")
@click.option("--keep-servers/--restart-servers", default=None,
              help="vllm: keep one server per model up across rounds (default: when memory allows).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
def bench(baseline, candidates, backend, serve, endpoints, out, tasks, limit, ppl_samples, ppl_seq_len, rounds,
          batch_sizes, prompt_len, gen_len, repeats, concurrency, num_prompts, input_len, output_len, skip,
          keep_servers, threads):
    """Measure the original and pruned models the same way: WikiText-2 PPL, zero-shot accuracy and
    speed, interleaved over rounds; write OUT/{bench.json, bench.md, *.png}."""
    import shutil

    from .bench.tasks import parse_tasks
    from .rewrite import atomic_write_dir

    backend = "vllm" if serve else backend
    if endpoints and backend != "openai":
        raise RtkError("--endpoint is for --backend openai")
    for p in (baseline, *candidates):
        if not p.is_dir():
            raise RtkError(f"--baseline/--candidate: {p}: no such folder")
        if not (p / "config.json").is_file() and backend != "onnx":
            raise RtkError(f"--baseline/--candidate: {p}: not a model folder (no config.json)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .bench.runner import BenchConfig, run_bench
    from .bench.report import write_report

    cfg = BenchConfig(baseline=str(baseline), candidates=[str(c) for c in candidates], backend=backend,
                      endpoints=list(endpoints), tasks=[] if tasks == "none" else parse_tasks(tasks), limit=limit,
                      ppl_samples=ppl_samples, ppl_seq_len=ppl_seq_len, rounds=rounds,
                      batch_sizes=_ints("--batch-sizes", batch_sizes), prompt_len=prompt_len, gen_len=gen_len,
                      repeats=repeats, concurrency=_ints("--concurrency", concurrency), num_prompts=num_prompts,
                      input_len=input_len, output_len=output_len, keep_servers=keep_servers,
                      quality="quality" not in skip, speed="speed" not in skip)
    tmp = atomic_write_dir(out)
    try:
        res = run_bench(cfg, tmp, echo=click.echo)
        write_report(res, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    click.echo(f"rtk bench: wrote {out}/bench.json, {out}/bench.md")


def run():
    """Entry point: a user error prints one line; Ctrl-C exits 130 without a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
