"""Start and stop a local vLLM OpenAI-compatible server (its command line comes from serve.flags)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import requests

from rtk.errors import RtkError
from rtk.serve.flags import preflight, vllm_command


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
