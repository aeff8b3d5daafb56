"""`rtk prune RECIPE`: parse -> rtk.prune.api.prune -> echo."""
from __future__ import annotations

from pathlib import Path

import click


from rtk.cli.echo import echo_healed


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/<recipe name>).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many search steps; rerunning the same command continues.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--no-heal", "no_heal", is_flag=True,
              help="Leave the recipe's heal: section out; heal later on N processes with "
                   "torchrun --nproc-per-node N -m rtk heal OUT -o HEALED --config RECIPE.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prune(recipe: Path, out: Path | None, max_steps: int | None, threads: int | None, no_heal: bool, quiet: bool):
    """Score every sublayer, search which to remove, and write OUT/{plan.json, model/, report.md}."""
    from rtk.prune.api import SearchPaused, prune as run

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        res = run(recipe, out, progress=not quiet, echo=click.echo, max_steps=max_steps, heal=not no_heal)
    except SearchPaused as exc:
        click.echo(str(exc))
        return
    ev, counted = res.plan["eval"], res.plan.get("params_counted") or {}
    non_embedding = (f"; {counted['removed_fraction']:.1%} of the {counted['total']:,} non-embedding ones"
                     if counted.get("count") == "non_embedding" else "")
    click.echo(
        f"rtk: removed {_what(res.plan['removed'])}, {res.params_removed:,} of {res.params_total:,} "
        f"parameters ({res.params_removed_fraction:.1%}{non_embedding})\n"
        f"rtk: {ev['file']} [{ev['split']}] PPL ({ev['samples']}x{ev['seq_len']} tokens, "
        f"{res.plan['recipe']['dtype']}): "
        f"{res.ppl_before:.3f} before -> {res.ppl_after:.3f} after\n"
        f"rtk: wrote {res.out}/plan.json, {res.out}/model/, {res.out}/report.md"
    )
    if res.heal:
        echo_healed(res.heal)


def _what(removed: list[dict]) -> str:
    """'3 sublayers', '8 layers' or '2 layers and 3 sublayers': what a plan removed, by kind."""
    layers = sum(e.get("kind") == "layer" for e in removed)
    counts = ((layers, "layer"), (len(removed) - layers, "sublayer"))
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in counts if n]
    return " and ".join(parts) or "0 sublayers"
