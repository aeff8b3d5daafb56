"""`rtk bench` settings: BenchConfig holds every default (the CLI shows and uses these), and the model
folders a run measures are checked here before anything starts."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Optional

from rtk.errors import RtkError


@dataclass
class BenchConfig:
    baseline: str
    candidates: list[str]
    backend: str = "torch"
    endpoints: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    ppl_samples: int = 16
    ppl_seq_len: int = 256
    rounds: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    gen_len: int = 32
    repeats: int = 3
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    num_prompts: int = 8
    input_len: int = 128
    output_len: int = 32
    chat: bool = False                   # served speed as chat requests (/v1/chat/completions, the chat template)
    dtype: str = "float32"
    keep_servers: Optional[bool] = None  # None: decide from free memory
    quality: bool = True
    speed: bool = True
    sweep: Optional[str] = None          # None | "guidellm" | "rates"
    sweep_seconds: int = 20              # per sweep point
    sweep_points: int = 6                # guidellm: sweep_size (synchronous, throughput, then constant rates)
    sweep_rates: list[float] = field(default_factory=list)  # "rates": request rates (req/s); [] = from a probe
    lm_eval_batch_size: int = 8


MINIMUM = {"ppl_seq_len": 2, "sweep_seconds": 5}  # every other count is at least 1
CHOICES = {"sweep": (None, "guidellm", "rates")}


def minimum(name: str) -> int:
    """The smallest value a count setting takes (the CLI's ranges and rtk.bench's checks)."""
    return MINIMUM.get(name, 1)


def check_settings(settings: dict) -> dict:
    """BenchConfig fields given by a caller (rtk.bench's keywords), checked as the CLI's options are: counts are
    integers at their minimum, lists of counts are non-empty, switches are booleans."""
    kinds = {f.name: default(f.name) for f in fields(BenchConfig) if f.name not in ("baseline", "candidates")}
    for name, v in settings.items():
        flag, d = f"--{name.replace('_', '-')}", kinds[name]
        if name in CHOICES:
            ok = v in CHOICES[name]
            want = f"one of {', '.join(map(str, CHOICES[name]))}"
        elif isinstance(d, bool) or name == "keep_servers":
            ok, want = isinstance(v, bool) or (v is None and d is None), "True or False"
        elif isinstance(d, int) or name == "limit":
            ok = (v is None and d is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= minimum(name))
            want = f"an integer >= {minimum(name)}"
        elif isinstance(d, list) and name != "sweep_rates":
            ok = isinstance(v, (list, tuple)) and bool(v) and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
            want = "positive integers"
        else:
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and x > 0 for x in v)
            want = "positive numbers"
        if not ok:
            raise RtkError(f"{flag}: expected {want}, got {v!r}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def default(name: str):
    """BenchConfig's default for a field (what `rtk bench --help` shows)."""
    f = {f.name: f for f in fields(BenchConfig)}[name]
    return f.default if f.default is not MISSING else f.default_factory()


def csv(values) -> str:
    return ",".join(str(v) for v in values)


def model_folders(specs, backend: str) -> list[Path]:
    """The folders of --baseline and --candidate (an embedded spec or a .gguf file is dequantized to its cached
    folder); a missing folder, or one without config.json (except for ONNX), is one clear line."""
    from rtk.model.load import resolve

    folders = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("embedded:") or spec.endswith(".gguf"):
            spec = resolve(spec)
        p = Path(spec)
        if not p.is_dir():
            raise RtkError(f"--baseline/--candidate: {p}: no such folder")
        if not (p / "config.json").is_file() and backend != "onnx":
            raise RtkError(f"--baseline/--candidate: {p}: not a model folder (no config.json)")
        folders.append(p)
    return folders
