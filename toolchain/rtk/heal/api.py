"""`rtk.heal(pruned_dir, out=..., **settings)`: `rtk heal` in process (rtk.cli.heal is a thin layer over it).

    healed = rtk.heal("runs/demo", out="runs/demo-healed", tokens=8192, method="lora")
    healed.ppl_before, healed.ppl_after, healed.model_dir

`settings` are the keys of a recipe's heal: section (tokens, method, lr, data, ...), over `config` (a YAML
file, a mapping or a HealConfig). A bad input raises RtkError with the line the command prints, before
anything is written; OUT appears only when complete. `max_steps` pauses on purpose: HealPaused, and the same
call continues.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from rtk.errors import RtkError
from rtk.heal.config import HealConfig, load_heal_config
from rtk.heal.run import HealPaused
from rtk.plan import PLAN_FILE
from rtk.records.heal import LOSS_CURVE

__all__ = ["HealResult", "HealPaused", "heal", "launch_heal"]


@dataclass(frozen=True)
class HealResult:
    """What `rtk heal` wrote (OUT/{plan.json, model/, report.md, loss_curve.png}) and its numbers."""

    out: Path
    model_dir: Path  # OUT/model: the healed model, same shapes and format as the pruned one, verified
    plan_file: Path
    report: Path
    loss_curve: Path
    plan: dict  # plan.json, with `heal` (data, settings, loss per step, PPLs, tokens/s)
    method: str
    tokens: int
    tokens_per_second: float
    ppl_before: float  # the evaluation text, the pruned model
    ppl_after: float  # the same blocks, healed
    teacher_ppl: Optional[float]

    @classmethod
    def of(cls, out: Path, plan: dict) -> "HealResult":
        h = plan["heal"]
        return cls(out=out, model_dir=out / "model", plan_file=out / PLAN_FILE, report=out / "report.md",
                   loss_curve=out / LOSS_CURVE, plan=plan, method=h["method"], tokens=h["tokens"],
                   tokens_per_second=h["tokens_per_second"], ppl_before=h["eval"]["ppl_before"],
                   ppl_after=h["eval"]["ppl_after"], teacher_ppl=(h.get("teacher") or {}).get("ppl"))


def heal(pruned_dir: Union[str, Path], out: Union[str, Path], *, teacher: Optional[str] = None,
         config: Union[str, Path, Mapping, HealConfig, None] = None, device: str = "auto", dtype: str = "auto",
         max_steps: Optional[int] = None, progress: bool = True, echo: Optional[Callable[[str], None]] = print,
         **settings) -> Optional[HealResult]:
    """Distil PRUNED_DIR (an `rtk prune` output or a model folder with its plan.json) from its original model
    (`teacher`, default: the plan's) into `out`, as `rtk heal PRUNED_DIR -o OUT`. Under torchrun with several
    processes, every rank calls it; rank 0 returns the result, the others None."""
    from rtk.heal.run import run_heal

    cfg = load_heal_config(config, **settings)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise RtkError(f"--max-steps: expected a positive integer, got {max_steps!r}")
    out = Path(out)
    plan = run_heal(Path(pruned_dir), out, cfg, teacher=teacher, device=device, dtype=dtype, progress=progress,
                    echo=echo or (lambda s: None), max_steps=max_steps)
    return None if plan is None else HealResult.of(out, plan)


def launch_heal(nproc: int, argv: list[str], pruned_dir: Union[str, Path], out: Union[str, Path], *,
                teacher: Optional[str] = None, config=None, device: str = "auto", dtype: str = "auto",
                **settings) -> int:
    """`rtk heal --nproc N`: everything a healing checks before loading weights is checked here first, as for N
    processes (one line each: a process count that does not split the global batch, more processes than GPUs,
    the memory per process, the folders), then `rtk heal ARGV` runs under torchrun with N processes on this node;
    torchrun's exit status (0 also when OUT already holds this healing)."""
    from rtk.heal.distributed import World, launch, torchrun_env, world_device
    from rtk.heal.run import prepare_heal

    if torchrun_env() is not None:
        raise RtkError("--nproc: this process already runs under torchrun; leave --nproc out (torchrun set the "
                       "process count)")
    cfg = load_heal_config(config, **settings)
    if device not in ("auto", "cpu", "cuda"):
        raise RtkError(f"--device: {device}: with --nproc each process computes on its own GPU; give --device "
                       "cuda, auto or cpu")
    world = World(0, nproc, 0, nproc, world_device(device, 0, nproc))
    job = prepare_heal(Path(pruned_dir), Path(out), cfg, teacher, device, dtype, None, world)
    if job.complete:
        print(f"rtk: {out} already holds this healing")
        return 0
    return launch(nproc, argv, device)
