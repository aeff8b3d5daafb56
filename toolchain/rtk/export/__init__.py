"""`rtk export`: one table from format name to the function that writes it (imported only when used).

A format function takes (model_dir, out, **options) and returns a summary dict; options it does not
accept are reported as usage errors by `run_export`. `rtk.export(model_dir, format=..., out=...)` (rtk.export.api)
is the command in process.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from rtk import callable_stage
from rtk.errors import RtkError

callable_stage(__name__)
FORMATS: dict[str, str] = {
    "safetensors": "rtk.export.safetensors:export_dir",
    "onnx": "rtk.export.onnx:export_onnx",
    "per-layer-config": "rtk.export.safetensors:export_per_layer_config",
}


class UnknownFormat(RtkError):
    """The command reports it as a usage error of --format (exit 2)."""


class UnsupportedOption(RtkError):
    """An option the format does not take; the command reports it as a usage error (exit 2)."""


def exporter(fmt: str):
    if fmt not in FORMATS:
        raise UnknownFormat(f"unknown format '{fmt}'; rtk exports: {', '.join(FORMATS)}")
    module, func = FORMATS[fmt].split(":")
    return getattr(importlib.import_module(module), func)


def run_export(fmt: str, model_dir: str, out: Path, echo=None, **options) -> dict:
    """Dispatch to the format's function; options left at None/False are not passed."""
    fn = exporter(fmt)
    options = {k: v for k, v in options.items() if v not in (None, False)}
    accepted = inspect.signature(fn).parameters
    if echo is not None and "echo" in accepted:
        options["echo"] = echo
    for name in options:
        if name not in accepted:
            raise UnsupportedOption(f"--{name.replace('_', '-')} does not apply to --format {fmt}")
    return fn(model_dir, out, **options)
