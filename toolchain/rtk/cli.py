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


# --- rtk export ---------------------------------------------------------------------------------
# format -> "module:function" (imported lazily); each function is f(model_dir, out_dir, echo=...) -> report
FORMATS = {"onnx": "rtk.export.onnx:export_onnx"}


@main.command("export")
@click.argument("model_dir")
@click.option("--format", "fmt", required=True, help=f"Output format: {', '.join(FORMATS)}.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
def export(model_dir: str, fmt: str, out: Path):
    """Export MODEL_DIR (a standard Llama-family or an rtk-pruned folder) to OUT in FORMAT; the
    result is reloaded and checked against torch, and nothing is written unless it matches."""
    if fmt not in FORMATS:
        raise RtkError(f"--format: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    import importlib

    module, func = FORMATS[fmt].split(":")
    report = getattr(importlib.import_module(module), func)(model_dir, out, echo=click.echo)
    diffs = report.get("max_abs_diff", {})
    worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
    click.echo(f"rtk: wrote {out} ({fmt}) in {report.get('export_seconds', 0):.1f}s"
               + (f"; validated: max |diff| {worst[1]:.2g} ({worst[0]}) <= {report['atol']:g}" if worst else ""))


def run():
    """Entry point: a user error prints one line; Ctrl-C exits 130 without a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
