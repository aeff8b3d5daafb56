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


# --- rtk ablate -------------------------------------------------------------------------------
@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/<recipe name>-ablation).")
@click.option("--targets", default="0.1,0.2,0.3", show_default=True,
              help="Fractions of all parameters to remove, comma-separated.")
@click.option("--variants", default=None,
              help="Comma-separated subset of: params-progressive, params-oneshot, none-progressive, "
                   "none-oneshot, cost-progressive, cost-oneshot, blocks-ppl, blocks-bi (default: all).")
@click.option("--bench", is_flag=True, help="Also run rtk.bench on every exported variant.")
@click.option("--report-only", is_flag=True,
              help="Search nothing: write OUT.partial/ablation.md from the work saved so far.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ablate(recipe: Path, out: Path | None, targets: str, variants: str | None, bench: bool, report_only: bool,
           threads: int | None, quiet: bool):
    """Run the method, its ablations (normalize params|none|cost x progressive|one-shot) and whole-layer
    baselines (greedy by PPL, one-shot by block influence) from RECIPE's model at the same parameter
    targets; export and evaluate each; write OUT/{ablation.md, ablation.json, plots, models/}.
    RECIPE's search method, normalize, target and candidates are replaced by the variants; its model,
    data, protect and cost workload are used. Rerunning the same command resumes."""
    from .ablate import parse_targets, select_variants
    from .recipe import load_recipe

    rec = load_recipe(recipe)
    ts, vs = parse_targets(targets), select_variants(variants)
    bench_fn = None
    if bench:
        try:
            from .bench import bench_for_ablation as bench_fn
        except ImportError:
            raise RtkError("--bench: this build has no rtk.bench.bench_for_ablation(model_dir) yet") from None
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .ablate_run import run_ablation

    out = out or Path("runs") / f"{recipe.stem}-ablation"
    res = run_ablation(rec, out, ts, vs, progress=not quiet, echo=click.echo, bench=bench_fn, report_only=report_only)
    if report_only:
        click.echo(f"rtk: {len(res['rows'])} plans so far; wrote {out}.partial/ablation.md")
        return
    click.echo(f"rtk: {len(res['rows'])} plans ({len(res['variants'])} variants x {len(ts)} targets); "
               f"wrote {out}/ablation.md, {out}/ablation.json, {out}/ppl_vs_params.png, {out}/models/")


def run():
    """Entry point: a user error prints one line; Ctrl-C exits 130 without a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
