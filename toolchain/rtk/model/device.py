"""Where rtk computes: `device: auto | cpu | cuda | cuda:N` and `dtype: auto`, checked before any work.

auto is CUDA when torch sees a CUDA device, else the CPU; `dtype: auto` is bfloat16 on CUDA and float32 on
the CPU (the dtypes each runs fast and exactly enough for perplexity).
"""
from __future__ import annotations

import re

import torch

from rtk.errors import RtkError
from rtk.settings import DEVICE_PATTERN, DEVICES, DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # rtk.settings: the one list


def resolve_device(spec: str, field: str = "device") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a usable torch device string, or a one-line RtkError."""
    spec = str(spec).strip()
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise RtkError(f"{field}: '{spec}' is not one of {', '.join(DEVICES)}")
    if spec == "cpu":
        return "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return "cuda:0" if n else "cpu"
    if n == 0:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise RtkError(f"{field}: {spec} is not usable here ({why}; torch {torch.__version__}); "
                       "use device: cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= n:
        raise RtkError(f"{field}: {spec} does not exist here ({n} CUDA device{'s' * (n != 1)}: "
                       f"cuda:0..cuda:{n - 1})")
    return f"cuda:{index}"


def resolve_dtype(spec: str, device: str, field: str = "dtype") -> str:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU; a named dtype is kept."""
    if spec == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if spec not in DTYPES:
        raise RtkError(f"{field}: '{spec}' is not one of auto, {', '.join(DTYPES)}")
    return spec


def resolve_runtime(recipe):
    """A copy of the recipe with device and dtype made concrete (and checked) for this machine."""
    device = resolve_device(recipe.device)
    return recipe.model_copy(update={"device": device, "dtype": resolve_dtype(recipe.dtype, device)})
