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


# ---- rtk export ---------------------------------------------------------------------------------
from .export import FORMATS as _EXPORT_FORMATS  # noqa: E402  (a dict of names: imports nothing heavy)


@main.command("export")
@click.argument("model_dir")
@click.option("--format", "fmt", default="safetensors", show_default=True,
              help=f"Output format: {', '.join(_EXPORT_FORMATS)}.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Weight dtype (default: the dtype MODEL_DIR stores).")
@click.option("--plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A plan.json from `rtk prune`: remove its sublayers from MODEL_DIR before exporting.")
@click.option("--transformers-only", is_flag=True,
              help="Write a model that stock vLLM cannot serve (MLP before any attention) anyway.")
def export(model_dir: str, fmt: str, out: Path, dtype: str | None, plan: Path | None, transformers_only: bool):
    """Export MODEL_DIR (any folder rtk loads, e.g. OUT/model or a dense model) to -o OUT.

    The export is reloaded from disk and its logits compared with the model in memory (and with the
    original model run with the same sublayers skipped, when known) before it is moved into place."""
    from .export import UnknownFormat, UnsupportedOption, run_export

    try:
        s = run_export(fmt, model_dir, out, dtype=dtype, plan=plan, transformers_only=transformers_only)
    except UnknownFormat as exc:
        raise click.BadParameter(str(exc), param_hint="'--format'") from None
    except UnsupportedOption as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"rtk: wrote {out} ({s['architecture']}, {s['dtype']}, {s['params']:,} parameters, "
               f"{s['weight_bytes']:,} weight bytes; {len(s['removed_sublayers'])} sublayers absent)")
    for line in s.get("verification", []):
        click.echo(f"rtk: verified: {line}")


def run():
    """Entry point: a user error prints one line; Ctrl-C exits 130 without a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
