"""`rtk export MODEL_DIR --format F -o OUT`: parse -> rtk.export.api.export -> echo."""
from __future__ import annotations

from pathlib import Path

import click


from rtk.export import FORMATS as _EXPORT_FORMATS  # a dict of names: imports nothing heavy
from rtk.settings import DTYPE_NAMES


@click.command("export")
@click.argument("model_dir")
@click.option("--format", "fmt", default="safetensors", show_default=True,
              help=f"Output format: {', '.join(_EXPORT_FORMATS)}.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Weight dtype (default: the dtype MODEL_DIR stores).")
@click.option("--plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A plan.json from `rtk prune`: remove its sublayers from MODEL_DIR before exporting.")
def export(model_dir: str, fmt: str, out: Path, dtype: str | None, plan: Path | None):
    """Export MODEL_DIR (any folder rtk loads, e.g. OUT/model or a dense model) to -o OUT.

    The export is reloaded from disk and its logits compared with the model in memory (and with the
    original model run with the same sublayers skipped, when known) before it is moved into place."""
    from rtk.export import UnknownFormat, UnsupportedOption
    from rtk.export.api import export as run

    try:
        res = run(model_dir, fmt, out=out, dtype=dtype, plan=plan, echo=click.echo)
    except UnknownFormat as exc:
        raise click.BadParameter(exc.message, param_hint="'--format'") from None
    except UnsupportedOption as exc:
        raise click.UsageError(exc.message) from None
    s = res.summary
    if fmt == "onnx":
        diffs = res.max_abs_diff
        worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
        click.echo(f"rtk: wrote {out} (onnx) in {s.get('export_seconds', 0):.1f}s"
                   + (f"; validated: max |diff| {worst[1]:.2g} ({worst[0]}) <= {s['atol']:g}" if worst else ""))
        return
    click.echo(f"rtk: wrote {out} ({res.architecture}, {res.dtype}, {res.params:,} parameters, "
               f"{res.weight_bytes:,} weight bytes; {len(res.removed_sublayers)} sublayers absent)")
    for line in res.verification:
        click.echo(f"rtk: verified: {line}")
    click.echo(f"rtk: vLLM: {res.vllm}")
