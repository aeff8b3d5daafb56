"""`rtk bench` settings: BenchConfig holds every default (the CLI shows and uses these) and checks every value the
way a recipe is checked (pydantic: every problem at once, one line each, by rtk.settings.format_errors); the
model folders a run measures are checked here before anything starts."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationError

from rtk.data import EVALUATION, DataSpec
from rtk.errors import RtkError
from rtk.settings import DTYPE_NAMES, Strict, format_errors

Count = Annotated[int, Field(strict=True, ge=1)]  # an integer, not a bool or a string of one
Switch = Annotated[bool, Field(strict=True)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class BenchConfig(Strict):
    baseline: str
    candidates: list[str]
    backend: str = "torch"
    endpoints: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)
    limit: Optional[Count] = None
    ppl_samples: Count = Field(EVALUATION.samples, description="WikiText-2 test blocks (rtk.data.EVALUATION's)")
    ppl_seq_len: Annotated[int, Field(strict=True, ge=2)] = Field(EVALUATION.seq_len, description="tokens per block")
    rounds: Count = 3
    batch_sizes: list[Count] = Field(default_factory=lambda: [1, 8], min_length=1)
    prompt_len: Count = 128
    gen_len: Count = 32
    repeats: Count = 3
    concurrency: list[Count] = Field(default_factory=lambda: [1, 4], min_length=1)
    num_prompts: Count = 8
    input_len: Count = 128
    output_len: Count = 32
    chat: Switch = False                   # served speed as chat requests (/v1/chat/completions, the chat template)
    dtype: Literal[DTYPE_NAMES] = "float32"
    keep_servers: Optional[Switch] = None  # None: decide from free memory
    quantization: Optional[Literal["fp8"]] = None  # vLLM's online quantization of the candidates (not the baseline)
    quality: Switch = True
    speed: Switch = True
    sweep: Optional[Literal["guidellm", "rates"]] = None
    sweep_seconds: Annotated[int, Field(strict=True, ge=5)] = 20  # per sweep point
    sweep_points: Count = 6                # guidellm: sweep_size (synchronous, throughput, then constant rates)
    sweep_rates: list[Rate] = Field(default_factory=list)  # "rates": request rates (req/s); [] = from a probe
    lm_eval_batch_size: Count = 8

    def evaluation(self) -> DataSpec:
        """The text and blocks of the WikiText-2 PPL: rtk.data.EVALUATION, cut to ppl_samples x ppl_seq_len."""
        return EVALUATION.model_copy(update={"samples": self.ppl_samples, "seq_len": self.ppl_seq_len})


def bench_config(**values) -> BenchConfig:
    """A BenchConfig, or one RtkError naming every bad setting (rtk.bench's keywords, the CLI's options)."""
    try:
        return BenchConfig.model_validate(values)
    except ValidationError as exc:
        raise RtkError(format_errors(exc, "rtk bench")) from None


def default(name: str):
    """BenchConfig's default for a field (what `rtk bench --help` shows)."""
    return BenchConfig.model_fields[name].get_default(call_default_factory=True)


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
