"""`heal:` settings (a recipe's section, or `rtk heal --config`): what to distil on, how long, how."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from rtk.data import STREAMED_KINDS, DataSpec, same_text, text_name
from rtk.errors import RtkError
from rtk.outdir import fingerprint
from rtk.settings import Strict, format_errors

HEAL_TEXT_RULE = "heal on other text than the evaluation PPL is measured on"


class LoraSpec(Strict):
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
    of blocks the token budget needs, or every block the text holds when it holds fewer. `stream: true` reads the
    text record by record and never holds it whole (rtk.heal.blocks): for corpora of any size, also a .parquet
    file or a folder of .jsonl / .txt / .parquet shards."""

    samples: Optional[int] = Field(None, gt=0, description="token blocks in the pool (default: from the budget)")
    seq_len: int = Field(256, gt=1, description="tokens per block")
    stream: Optional[bool] = Field(None, description="read the text as a stream, tokenized and packed on the fly "
                                   "(default: true for a folder or .parquet, false otherwise)")
    shuffle_blocks: int = Field(4096, gt=0, description="stream: blocks shuffled together (the memory a stream holds)")
    repeat: bool = Field(False, description="stream: pass over the text again when it ends before the budget "
                         "(false: stop with one line)")

    @model_validator(mode="after")
    def _stream(self):
        if self.stream is None:
            self.stream = self.kind in STREAMED_KINDS
        if not self.stream:
            if self.kind in STREAMED_KINDS:
                raise ValueError(f"stream: a {self.kind} source is read as a stream; set stream: true (or leave it out)")
            for k in ("shuffle_blocks", "repeat"):
                if k in self.model_fields_set:
                    raise ValueError(f"{k}: applies to stream: true")
        elif self.samples is not None:
            raise ValueError("samples: a stream reads as many blocks as the token budget needs; leave samples out")
        return self

    def describe(self) -> str:
        if self.samples is None:
            return DataSpec.describe(self.model_copy(update={"samples": 0})).replace("0 blocks", "blocks")
        return super().describe()


class HealConfig(Strict):
    """Knowledge distillation of the pruned model (student) from the original (teacher), after the search.

    loss = kl_weight * T^2 * KL(teacher || student at temperature T) + ce_weight * CE(student, text).
    `tokens` is the training budget: optimizer steps = ceil(tokens / (micro_batch * grad_accum * seq_len)).
    `data.samples` is optional here (HealData)."""

    data: HealData = Field(default_factory=lambda: HealData(source="wikitext2", split="valid"),
                           description="training text: any source calibration accepts, not the evaluation text")
    tokens: int = Field(61_440, gt=0, description="training tokens (the budget); the default, 60 steps of 4 x 256, "
                        "is the demo's healing")
    method: Literal["full", "lora"] = Field("full", description="full: every weight; lora: peft LoRA adapters")
    lora: LoraSpec = LoraSpec()
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up linearly")
    min_lr: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr * min_lr")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="gradient clipping (null: none)")
    micro_batch: int = Field(4, gt=0, description="token blocks per forward/backward pass (per process: at most)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step: micro_batch x grad_accum blocks "
                            "are the global batch, split over the processes under torchrun")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.5, ge=0, description="weight of cross-entropy on the text itself")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the intermediate-state loss: the residual "
                                 "stream after every layer matched to the teacher's (normalized squared error)")
    train_embeddings: bool = Field(False, description="full: also train the token embeddings / LM head (off: "
                                   "they stay as the original model has them, and each step does less work)")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="recompute each layer in the backward pass; auto: when the estimated training "
        "memory does not fit the device")
    cpu_offload: bool = Field(False, description="processes under torchrun on CUDA: keep the weight shards, their "
                              "gradients and AdamW state in CPU memory (FSDP2's CPUOffloadPolicy); for the largest models")
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
        """What must match for a resume: everything but how often it checkpoints, where the shards live
        (cpu_offload) and what happens at the end of a stream (repeat: the blocks before it are the same); a
        setting left at a default that changes nothing leaves the fingerprint as it was before the setting existed."""
        d = self.model_dump(mode="json")
        for k in ("checkpoint_every", "cpu_offload"):
            d.pop(k, None)
        data = d["data"]
        data.pop("repeat", None)
        if not data.pop("stream"):
            data.pop("shuffle_blocks", None)
        return fingerprint(d)


def evaluation_clash(heal_data: DataSpec, evaluation: DataSpec) -> Optional[str]:
    """The name of the evaluation text when healing would train on it, else None (the one rule; the recipe
    and rtk heal both ask it). A folder of shards clashes when the evaluation file is among them."""
    if same_text(heal_data, evaluation):
        return text_name(evaluation)
    if heal_data.kind == "folder":
        ev = evaluation_file(evaluation)
        folder = Path(heal_data.source).expanduser().resolve()
        if ev is not None and folder in ev.parents:
            return f"{text_name(evaluation)}, {ev.name} in that folder"
    return None


def evaluation_file(evaluation: DataSpec) -> Optional[Path]:
    """The file the evaluation text is read from on this machine, where it is a file."""
    if evaluation.kind == "wikitext2":
        root = os.environ.get("RTK_DATA_DIR")
        return (Path(root) / "wikitext-2-raw" / f"{evaluation.split}.txt").resolve() if root else None
    if evaluation.kind in ("jsonl", "text"):
        return Path(evaluation.source).expanduser().resolve()
    return None


def check_heal_text(cfg: HealConfig, evaluation: DataSpec, field: str = "heal.data") -> None:
    clash = evaluation_clash(cfg.data, evaluation)
    if clash:
        raise RtkError(f"{field}: is the evaluation text ({clash}); {HEAL_TEXT_RULE}")


def load_heal_config(path: Union[Path, str, Mapping, HealConfig, None], **overrides) -> HealConfig:
    """--config FILE (the keys of a recipe's heal: section, or a recipe with a heal: section), or those keys as a
    mapping or a HealConfig (rtk.heal(config=...)), with the overrides that are not None (command-line options,
    rtk.heal's keyword settings); every problem reported at once, one line each."""
    import yaml

    data, where = {}, "heal"
    if isinstance(path, HealConfig):
        data = path.model_dump(exclude_unset=True)
    elif isinstance(path, Mapping):
        data = dict(path)
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise RtkError(f"--config {path}: file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise RtkError(f"--config {path}: not valid YAML") from None
        if not isinstance(data, dict):
            raise RtkError(f"--config {path}: expected a mapping of heal keys (tokens, method, lr, ...)")
        if "heal" in data:
            data = data["heal"] or {}
        where = f"{path}: heal"
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return HealConfig.model_validate(data)
    except ValidationError as exc:
        raise RtkError(format_errors(exc, where).replace(f"{where}: (top level): ", f"{where}: ")) from None
