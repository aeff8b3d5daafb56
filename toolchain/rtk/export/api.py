"""`rtk.export(model_dir, format=..., out=...)`: `rtk export` in process (rtk.cli.export is a thin layer over it).

    written = rtk.export("runs/demo/model", format="onnx", out="runs/demo-onnx")
    written.summary["max_abs_diff"], written.out

Every export is reloaded and verified before it is moved to `out`; a bad input (an unknown format, an option
the format does not take, a folder that exists) raises RtkError with the line the command prints, and nothing
is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from rtk.export import run_export

__all__ = ["ExportResult", "export"]


@dataclass(frozen=True)
class ExportResult:
    """What `rtk export` wrote at `out`, and how it verified."""

    out: Path
    format: str
    summary: dict  # the format writer's own record (safetensors: the model card is made from it)
    architecture: Optional[str] = None  # safetensors / per-layer-config: config.json's architectures entry
    layout: Optional[str] = None  # rtk.export.layouts: standard | native | plugin | per-layer-config
    dtype: Optional[str] = None
    params: Optional[int] = None
    weight_bytes: Optional[int] = None
    removed_sublayers: list = field(default_factory=list)
    vllm: Optional[str] = None  # how vLLM serves the folder
    verification: list = field(default_factory=list)  # safetensors: one line per check of the reloaded folder
    max_abs_diff: dict = field(default_factory=dict)  # onnx: the worst |logit difference| per validation

    @classmethod
    def of(cls, fmt: str, out: Path, s: dict) -> "ExportResult":
        return cls(out=out, format=fmt, summary=s, architecture=s.get("architecture"), layout=s.get("layout"),
                   dtype=s.get("dtype"), params=s.get("params"), weight_bytes=s.get("weight_bytes"),
                   removed_sublayers=list(s.get("removed_sublayers", [])), vllm=s.get("vllm"),
                   verification=list(s.get("verification", [])), max_abs_diff=dict(s.get("max_abs_diff", {})))


def export(model_dir: Union[str, Path], format: str = "safetensors", *, out: Union[str, Path],
           dtype: Optional[str] = None, plan: Union[str, Path, None] = None,
           echo: Optional[Callable[[str], None]] = print) -> ExportResult:
    """Export MODEL_DIR (any folder rtk loads: OUT/model, a dense model, embedded:smollm2) as `format`
    (safetensors | onnx | per-layer-config) to `out`, as `rtk export MODEL_DIR --format F -o OUT`. `plan`: a
    plan.json whose sublayers are removed from MODEL_DIR first."""
    out = Path(out)
    s = run_export(format, str(model_dir), out, echo=echo, dtype=dtype, plan=Path(plan) if plan else None)
    return ExportResult.of(format, out, s)
