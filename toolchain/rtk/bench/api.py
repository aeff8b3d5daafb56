"""`rtk.bench(baseline=..., candidates=[...], out=..., **settings)`: `rtk bench` in process (rtk.cli.bench is a
thin layer over it).

    res = rtk.bench(baseline="embedded:smollm2", candidates=["runs/demo/model"], out="runs/demo-bench",
                    backend="torch", tasks="none", rounds=2, batch_sizes=[1])
    res.ppl, res.ratios["candidate1"]["b1.decode_tokens_per_s"]["median"]

`settings` are BenchConfig's fields (rtk.bench.config holds every default: rounds, batch_sizes, prompt_len,
concurrency, input_len, ...). A bad input raises RtkError with the line the command prints (every bad setting at
once), before a model loads or a server starts; OUT appears only when bench.json is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from rtk.bench.config import bench_config, model_folders
from rtk.errors import RtkError

__all__ = ["BenchResult", "bench"]


@dataclass(frozen=True)
class BenchResult:
    """What `rtk bench` wrote (OUT/{bench.json, bench.md, *.png, lm_eval/, vllm_bench/, logs/}) and its numbers."""

    out: Path
    bench_json: Path
    report: Path  # bench.md
    result: dict  # bench.json: config, versions, machine, every model's numbers per round, ratios, how measured
    models: dict  # label (baseline, candidate1, ...) -> the model folder measured
    ppl: dict  # label -> WikiText-2 test PPL (when quality was measured)
    ratios: dict  # candidate label -> metric -> candidate/baseline (speed: per round, median, min, max)

    @classmethod
    def of(cls, out: Path, res: dict) -> "BenchResult":
        models = res["models"]
        return cls(out=out, bench_json=out / "bench.json", report=out / "bench.md", result=res,
                   models={m["label"]: m["path"] for m in models},
                   ppl={m["label"]: m["quality"]["wikitext2"]["ppl"] for m in models if m.get("quality")},
                   ratios=res["ratios"])


def bench(baseline: Union[str, Path], candidates: Union[str, Path, Sequence[Union[str, Path]]],
          out: Union[str, Path], *, backend: str = "torch", endpoints: Sequence[str] = (),
          tasks: Union[str, Sequence[str], None] = None, dtype: str = "auto", card: Union[str, Path, None] = None,
          echo: Optional[Callable[[str], None]] = print, **settings) -> BenchResult:
    """Measure `baseline` and `candidates` the same way into `out`, as `rtk bench --baseline A --candidate B -o OUT`.
    `tasks`: lm-eval tasks (a list, "a,b", "all" or "none"; default all, none with backend onnx); `dtype`: auto
    (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16 | float16; `card`: a candidate folder whose model
    card gets this run's sections."""
    from rtk.bench.accuracy.tasks import parse_tasks
    from rtk.bench.backends import BACKENDS, serving_device
    from rtk.model.device import resolve_dtype

    if backend not in BACKENDS:
        raise RtkError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    if endpoints and backend != "openai":
        raise RtkError("--endpoint is for --backend openai")
    candidates = [candidates] if isinstance(candidates, (str, Path)) else list(candidates)
    dtype = resolve_dtype(dtype, serving_device() if backend == "vllm" else "cpu", "--dtype")
    cfg = bench_config(baseline=str(baseline), candidates=[str(c) for c in candidates], backend=backend,
                       endpoints=list(endpoints), dtype=dtype, **settings)  # every bad setting, before any work
    folders = model_folders((baseline, *candidates), backend)
    if tasks is None:
        tasks = "none" if backend == "onnx" else "all"
    if not isinstance(tasks, str):
        tasks = ",".join(tasks) or "none"
    cfg = cfg.model_copy(update={"baseline": str(folders[0]), "candidates": [str(c) for c in folders[1:]],
                                 "tasks": [] if tasks == "none" else parse_tasks(tasks)})
    from rtk.bench.run import run_bench_to

    out = Path(out)
    res = run_bench_to(cfg, out, echo=echo or (lambda s: None), card=Path(card) if card is not None else None)
    return BenchResult.of(out, res)
