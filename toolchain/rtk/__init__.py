"""rtk: remove whole attention / MLP sublayers by their measured impact on perplexity.

The Python API is the commands, called in process (rtk.cli is a thin layer over them):

    import rtk
    pruned = rtk.prune("recipes/smollm2-demo.yaml", out="runs/demo")       # rtk.prune.api.PruneResult
    healed = rtk.heal(pruned.out, out="runs/demo-healed", tokens=8192)      # rtk.heal.api.HealResult
    onnx = rtk.export(healed.model_dir, format="onnx", out="runs/demo-onnx")  # rtk.export.api.ExportResult
    int8 = rtk.quantize(onnx.out, scheme="ort-int8", out="runs/demo-onnx-int8")  # rtk.quantize.api.QuantizeResult
    res = rtk.bench(baseline="embedded:smollm2", candidates=[healed.model_dir], out="runs/demo-bench")

`rtk.prune`, `rtk.heal`, `rtk.export`, `rtk.quantize` and `rtk.bench` are the stage packages themselves, made
callable (each call is its `api` module's function of the same name), so `import rtk.prune.run` and friends keep
working. A bad input raises `rtk.RtkError` with the one line the command prints, and leaves nothing half-written.
`import rtk` imports no torch: a stage loads when it is called.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"
# The name on PyPI: PyPI's `rtk` is an unrelated GPIO library. The import name and the command stay `rtk`.
DISTRIBUTION = "rtk-prune"
API = ("prune", "heal", "export", "quantize", "bench")  # the stages that are also functions


def pip_install(extra: str = "") -> str:
    """The line that installs rtk (with an extra), for every message and file that tells a user to."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


class Stage(types.ModuleType):
    """A stage package that is also its Python API: `rtk.prune(...)` calls `rtk.prune.api.prune(...)`."""

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    def _function(self):
        stage = self.__name__.rsplit(".", 1)[1]
        return getattr(importlib.import_module(f"{self.__name__}.api"), stage)

    @property
    def __signature__(self):  # inspect.signature(rtk.prune), IPython's rtk.prune?
        import inspect

        return inspect.signature(self._function())


def callable_stage(name: str) -> None:
    """Called by each API stage's __init__ with its own __name__."""
    sys.modules[name].__class__ = Stage


def __getattr__(name: str):
    """rtk.prune before anything imported it; rtk.RtkError."""
    if name in API:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "RtkError":
        from rtk.errors import RtkError

        return RtkError
    raise AttributeError(f"module 'rtk' has no attribute '{name}'")
