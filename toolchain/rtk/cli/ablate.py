"""`rtk ablate RECIPE`: parse -> recipe, variants, targets -> rtk.ablate.run -> echo."""
from __future__ import annotations

from pathlib import Path

import click

from rtk.errors import RtkError


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/<recipe name>-ablation).")
@click.option("--targets", default="0.1,0.2,0.3", show_default=True,
              help="Fractions of the parameters to remove (all of them, or the non-embedding ones where the recipe's "
                   "search.target.count says non_embedding), comma-separated.")
@click.option("--variants", default=None,
              help="Comma-separated subset of: params-progressive, params-oneshot, none-progressive, "
                   "none-oneshot, cost-progressive, cost-oneshot, blocks-ppl, blocks-bi, blocks-kl, "
                   "params-progressive-kl (default: all).")
@click.option("--bench", is_flag=True,
              help="Then measure every exported model: zero-shot accuracy (lm-eval, hf model) and served speed "
                   "(vllm bench serve) vs the dense model under vLLM on a short and a KV-heavy workload "
                   "(rtk.ablate.measure). Also adds "
                   "measurements to a complete OUT.")
@click.option("--bench-tasks", default="all", show_default=True, help="Zero-shot tasks for --bench (or none).")
@click.option("--bench-limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="First N documents of each zero-shot task for --bench.")
@click.option("--bench-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Interleaved dense/candidate speed rounds per model for --bench.")
@click.option("--heal", "heal_", is_flag=True,
              help="Then heal every exported model with the same budget (the recipe's heal: section, or the "
                   "defaults of rtk heal) and add 'PPL after healing' to the table. Also adds healing to a complete OUT.")
@click.option("--heal-tokens", type=int, default=None, help="Training tokens per model for --heal.")
@click.option("--report-only", is_flag=True,
              help="Search nothing: write OUT.partial/ablation.md from the work saved so far.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ablate(recipe: Path, out: Path | None, targets: str, variants: str | None, bench: bool, bench_tasks: str,
           bench_limit: int, bench_rounds: int, heal_: bool, heal_tokens: int | None, report_only: bool,
           threads: int | None, quiet: bool):
    """Run the method, its ablations (normalize params|none|cost x progressive|one-shot) and whole-layer
    baselines (greedy by PPL, one-shot by block influence) from RECIPE's model at the same parameter
    targets; export and evaluate each; write OUT/{ablation.md, ablation.json, plots, models/}.
    RECIPE's search method, normalize, target and candidates are replaced by the variants; its model,
    data, protect and cost workload are used. Rerunning the same command resumes."""
    from rtk.ablate.variants import parse_targets, select_variants
    from rtk.prune.config import load_recipe

    from rtk.model.device import resolve_runtime

    rec = resolve_runtime(load_recipe(recipe))
    ts, vs = parse_targets(targets), select_variants(variants)
    out = out or Path("runs") / f"{recipe.stem}-ablation"
    heal_cfg = None
    if heal_tokens is not None and not heal_:
        raise RtkError("--heal-tokens: goes with --heal")
    if heal_ and not report_only:
        from rtk.heal.config import load_heal_config

        # the recipe's heal: section, with --heal-tokens over its tokens only when given
        heal_cfg = load_heal_config(rec.heal, tokens=heal_tokens)
    bench_obj = None
    if bench and not report_only:
        from rtk.ablate.measure import AblationBench, AblationBenchConfig
        from rtk.bench.accuracy.tasks import parse_tasks

        tasks = [] if bench_tasks.strip() == "none" else parse_tasks(bench_tasks)
        log_dir = out.with_name(out.name + "-bench-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        bench_obj = AblationBench(AblationBenchConfig(tasks=tasks, limit=bench_limit, rounds=bench_rounds,
                                                      dtype=rec.dtype), log_dir, echo=click.echo)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from rtk.ablate.run import run_ablation

    res = run_ablation(rec, out, ts, vs, progress=not quiet, echo=click.echo, bench=bench_obj, report_only=report_only,
                       heal=heal_cfg)
    if report_only:
        click.echo(f"rtk: {len(res['rows'])} plans so far; wrote {out}.partial/ablation.md")
        return
    click.echo(f"rtk: {len(res['rows'])} plans ({len(res['variants'])} variants x {len(ts)} targets); "
               f"wrote {out}/ablation.md, {out}/ablation.json, {out}/ppl_vs_params.png, {out}/models/")
