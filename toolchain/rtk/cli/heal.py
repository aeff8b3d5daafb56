"""`rtk heal PRUNED_DIR -o OUT`: parse -> rtk.heal.api.heal -> echo."""
from __future__ import annotations

import os
from pathlib import Path

import click


from rtk.cli.echo import echo_healed
from rtk.settings import DEVICE_HELP


@click.command()
@click.argument("pruned_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/{plan.json, model/, report.md, loss_curve.png}.")
@click.option("--teacher", default=None, help="The original model (default: plan.json's model_path / model).")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML with heal settings (the keys of a recipe's heal: section, or a recipe with one).")
@click.option("--tokens", type=int, default=None, help="Training tokens (overrides the config).")
@click.option("--method", type=click.Choice(["full", "lora"]), default=None, help="Overrides the config.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Pause after this many optimizer steps; rerunning the same command continues.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (per process).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Heal on N processes on this node: starts torchrun (one per GPU on CUDA; FSDP2 shards the models). "
                   "Across nodes, run torchrun yourself: torchrun --nnodes ... -m rtk heal ...")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def heal(pruned_dir: Path, out: Path, teacher: str | None, config: Path | None, tokens: int | None,
         method: str | None, device: str, dtype: str, max_steps: int | None, threads: int | None,
         nproc: int | None, quiet: bool):
    """Heal a pruned model by knowledge distillation from the original (teacher).

    PRUNED_DIR is an `rtk prune` output (or a model folder with its plan.json); the healed model is
    exported and verified as `rtk prune` exports, with the same shapes. Under torchrun
    (`torchrun --nproc-per-node N -m rtk heal ...`) or with --nproc N, N processes heal together."""
    from rtk.heal.api import HealPaused, heal as run

    if nproc and nproc > 1:
        from rtk.heal.api import launch_heal

        argv = [str(pruned_dir), "-o", str(out), "--device", device, "--dtype", dtype]
        for flag, value in (("--teacher", teacher), ("--config", config), ("--tokens", tokens),
                            ("--method", method), ("--max-steps", max_steps), ("--threads", threads)):
            if value is not None:
                argv += [flag, str(value)]
        if quiet:
            argv.append("--quiet")
        code = launch_heal(nproc, argv, pruned_dir, out, teacher=teacher, config=config, device=device, dtype=dtype,
                           tokens=tokens, method=method)
        if code:
            raise SystemExit(code)
        return
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        res = run(pruned_dir, out, teacher=teacher, config=config, device=device, dtype=dtype, progress=not quiet,
                  echo=click.echo, max_steps=max_steps, tokens=tokens, method=method)
    except HealPaused as exc:
        if os.environ.get("RANK", "0") == "0":
            click.echo(str(exc))
        return
    if res is None:  # a rank other than 0 of several: rank 0 reports
        return
    echo_healed(res.plan["heal"])
    click.echo(f"rtk: wrote {res.out}/plan.json, {res.out}/model/, {res.out}/report.md, {res.loss_curve}")
