"""The recipe of `rtk prune`: a validated, fully-resolved description of one pruning run (its data and
heal: sections are rtk.data's and rtk.heal.config's settings).

Unknown keys are errors; every problem in a file is reported at once, one line each field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from rtk.bench.accuracy.tasks import TASKS
from rtk.data import DataConfig, DataSpec, same_text, text_name
from rtk.errors import RtkError
from rtk.heal.config import HEAL_TEXT_RULE, HealConfig, evaluation_clash
from rtk.model.sublayer import is_name
from rtk.outdir import fingerprint
from rtk.settings import DEVICE_HELP, DEVICE_PATTERN, DEVICES, UNION_TAG, Dtype, Strict, format_errors
from rtk.prune.criteria import CRITERIA, SEARCHED


class Target(Strict):
    """Stop rule: exactly one of these (and, for params_removed, which parameters it counts)."""

    params_removed: Optional[float] = Field(None, description="fraction of the counted parameters, in (0, 1)")
    ppl_increase: Optional[float] = Field(None, description="relative PPL budget, e.g. 0.5 = +50%")
    ppl_max: Optional[float] = Field(None, description="absolute PPL budget")
    sublayers: Optional[int] = Field(None, description="number of sublayers to remove")
    speedup: Optional[float] = Field(None, description="predicted serving speedup to reach, e.g. 1.3 (cost: says "
                                     "the workload; cost.profile a measured profile, else the roofline)")
    count: Literal["all", "non_embedding"] = Field(
        "all", description="params_removed counts all parameters, or those outside the token embedding and LM "
        "head (non_embedding: for models whose embedding is most of them, e.g. Gemma 3 270M)")

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

    @field_validator("speedup")
    @classmethod
    def _faster(cls, v):
        if v is not None and not v > 1.0:
            raise ValueError(f"must be > 1 (a speedup over the dense model), got {v}")
        return v

    @field_validator("sublayers")
    @classmethod
    def _count(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    def rules(self) -> dict:
        """The stop rules (the count left out), set or not."""
        return self.model_dump(exclude={"count"})

    @model_validator(mode="after")
    def _exactly_one(self):
        set_ = [k for k, v in self.rules().items() if v is not None]
        if len(set_) != 1:
            raise ValueError(
                "give exactly one of params_removed, ppl_increase, ppl_max, sublayers, speedup"
                + (f" (got {', '.join(set_)})" if set_ else "")
            )
        if self.count != "all" and self.params_removed is None:
            raise ValueError(f"count: {self.count} applies to params_removed, not to {set_[0]}")
        return self

    def describe(self) -> str:
        k, v = next((k, v) for k, v in self.rules().items() if v is not None)
        return f"{k}={v}" + (f" ({self.count})" if self.count != "all" else "")


CANDIDATE_FAMILIES = ("sublayers", "blocks")  # what a search may remove: sublayers, or whole layers


class SearchConfig(Strict):
    method: Literal["progressive", "one-shot", "global"] = Field(
        "progressive", description="progressive (re-score after each removal), one-shot (rank once), global (the "
        "set with the lowest summed RI that reaches a params_removed target: an exact knapsack over one scoring)")
    normalize: Literal["params", "none", "cost"] = "params"
    target: Target = Target(params_removed=0.2)
    protect: list[str] = Field(default_factory=lambda: ["attn.0"])
    candidates: Literal[CANDIDATE_FAMILIES] = Field(
        "sublayers", description="'blocks' removes whole layers (attn+mlp together)"
    )
    criterion: Literal[SEARCHED] = Field(
        "ppl", description="what a removal's relative impact is measured on (a criterion of rtk.prune.criteria "
        "searched with a scorer): ppl (calibration perplexity, the paper's) or kl (exp of the mean KL divergence from the original model's next-token distributions on the "
        "calibration blocks); plan.json's ppl_after stays calibration PPL either way")
    rescoring: Literal["full", "lazy"] = Field(
        "full", description="progressive: full re-scores every candidate each step (the paper's); lazy re-scores "
        "only those that can still be the minimum (rtk.prune.search.run_search)")

    @field_validator("protect")
    @classmethod
    def _names(cls, v):
        for name in v:
            if not is_name(name):
                raise ValueError(f"'{name}' is not a sublayer name like 'attn.0', 'mlp.12' or 'layer.3'")
        return v

    @model_validator(mode="after")
    def _lazy_is_progressive(self):
        if self.rescoring == "lazy" and self.method != "progressive":
            raise ValueError("rescoring: lazy applies to method: progressive (one-shot scores once)")
        ppl_target = self.target.ppl_increase is not None or self.target.ppl_max is not None
        if ppl_target and not CRITERIA[self.criterion].measures_ppl:
            raise ValueError(f"criterion: {self.criterion}: a ppl_increase / ppl_max target is in calibration PPL, "
                             f"which a {self.criterion.upper()} search does not measure at each step; give "
                             "params_removed, sublayers or speedup")
        if self.method == "global" and self.target.params_removed is None:
            raise ValueError("method: global supports target params_removed (a budget that adds up over sublayers)")
        return self


# cost: keys added after recipes were first fingerprinted: at these values they leave a fingerprint unchanged
COST_KEYS_ADDED = {"phase": "decode", "profile": None, "engine": None}


class CostConfig(Strict):
    """The serving workload a sublayer's cost is judged on (normalize: cost, target: speedup): a measured
    profile of the user's engine (`profile`, see rtk.model.speed), else the roofline of rtk.model.cost for one
    step of `batch` sequences at `context` tokens in `phase`."""

    batch: int = Field(16, gt=0)
    context: int = Field(2048, gt=0)
    phase: Literal["decode", "prefill"] = Field("decode", description="roofline: the step whose time counts")
    profile: Optional[str] = Field(None, description="a speed profile JSON (rtk.model.speed): measured shares "
                                   "of the step time per sublayer kind, used instead of the roofline")
    engine: Optional[str] = Field(None, description="the engine the profile must have been measured on")


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


class ScoringConfig(Strict):
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


FAMILIES = (*CANDIDATE_FAMILIES, "spans")  # select's: a search's candidates, or one run of consecutive layers


DEFAULT_JUDGE_TEXT = DataSpec(source="wikitext2", split="valid", samples=16, seq_len=256)


def judge_documents(task: str, limit: int) -> range:
    """The documents of `task` that judge select's finalists: its last `limit` (rtk bench --limit N reports on
    the first N, so the two never meet while N <= the task's documents - limit)."""
    docs = TASKS[task].docs
    return range(docs - limit, docs)


class TaskJudge(Strict):
    """select's judge on the user's task: each healed finalist scored by lm-eval (its `hf` model on the finalist
    saved to a folder, as rtk bench runs it) on the last `limit` documents of every task; `text` ranks the
    proposals before healing (PPL, which picks the finalists)."""

    tasks: list[str] = Field(description=f"lm-eval tasks rtk knows ({', '.join(TASKS)})")
    limit: int = Field(description="documents of each task that judge: its last `limit`")
    metric: Literal["acc", "acc_norm"] = Field("acc", description="the score averaged over the tasks")
    report: Optional[int] = Field(None, description="the documents that report (rtk bench --limit N: the first N "
                                  "of each task), refused where they meet the judge's; null: the rest of each task")
    text: DataSpec = Field(default_factory=lambda: DEFAULT_JUDGE_TEXT.model_copy(),
                           description="held-out text every proposal is ranked on before healing")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        bad = [t for t in v if t not in TASKS]
        if bad or not v:
            raise ValueError(f"unknown task {', '.join(map(repr, bad)) or '(none given)'}; known: {', '.join(TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: a task appears twice")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v, info):
        if v < 1:
            raise ValueError(f"{v} documents judge nothing; give 1 or more")
        for t in info.data.get("tasks", []):
            if v > TASKS[t].docs:
                raise ValueError(f"{v} is more than {t}'s {TASKS[t].docs} documents")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v, info):
        bare = [t for t in info.data.get("tasks", []) if not TASKS[t].acc_norm]
        if v == "acc_norm" and bare:
            raise ValueError(f"lm-eval reports no acc_norm for {', '.join(bare)}; use acc")
        return v

    @field_validator("report")
    @classmethod
    def _report(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"{v}: give the number of documents that report, 1 or more")
        limit = info.data.get("limit")
        for t in info.data.get("tasks", []) if v is not None and limit is not None else []:
            n = TASKS[t].docs
            if v > n - limit:
                raise ValueError(f"the first {v} documents of {t} report and its last {limit} judge: they overlap "
                                 f"({n} documents); the documents that judge never report")
        return v


def _judge_kind(v) -> str:
    kind = "tasks" if isinstance(v, TaskJudge) or (isinstance(v, dict) and "tasks" in v) else "text"
    return UNION_TAG + kind


def judge_text(sel: "SelectConfig") -> DataSpec:
    """The held-out text select ranks proposals on before healing (and, for a PPL judge, judges on after)."""
    return sel.judge.text if isinstance(sel.judge, TaskJudge) else sel.judge


class SelectConfig(Strict):
    """Selection judged after healing (rtk.prune.select): one plan per candidate family x criterion, each reaching
    search.target; the `finalists` most promising are healed briefly (`heal`) and judged by their PPL on held-out
    calibration text (`judge`: blocks that neither the search's calibration nor this healing touched, never the
    evaluation text), or by lm-eval on the user's tasks (`judge: {tasks, limit}`, TaskJudge); the best after healing
    is the output unless its lead is inside the paired interval (then the fastest tied finalist). Families: sublayers (attention / MLP branches),
    blocks (whole layers), spans (one run of consecutive layers, Minitron's depth pruning). Criteria: ppl
    (calibration PPL, the paper's RI), kl (KL divergence from the original model's next-token distribution), bi
    (block influence, 1 - cos of the residual stream around the piece, ShortGPT; one pass, no removal)."""

    families: list[Literal[FAMILIES]] = Field(default_factory=lambda: list(FAMILIES))
    criteria: list[Literal[tuple(CRITERIA)]] = Field(default_factory=lambda: ["ppl", "bi"])
    finalists: int = Field(4, description="plans healed and judged: one per family first (its best before "
                           "healing), then the next best overall")
    heal: HealConfig = Field(default_factory=lambda: HealConfig(tokens=8192),
                             description="the brief healing of every finalist (rtk heal's loop)")
    judge: Annotated[Union[Annotated[DataSpec, Tag(f"{UNION_TAG}text")],
                           Annotated[TaskJudge, Tag(f"{UNION_TAG}tasks")]],
                     Discriminator(_judge_kind)] = Field(
        default_factory=lambda: DEFAULT_JUDGE_TEXT.model_copy(),
        description="held-out text the finalists are judged on after healing (PPL), or lm-eval tasks: "
        "{tasks: [...], limit: N} (TaskJudge)")

    @field_validator("finalists")
    @classmethod
    def _some(cls, v):
        if v < 1:
            raise ValueError(f"{v} finalists leave no plan to choose; give 1 or more")
        return v

    @field_validator("families", "criteria")
    @classmethod
    def _listed(cls, v):
        if not v:
            raise ValueError("name at least one")
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: a name appears twice")
        return v


class Recipe(Strict):
    model: str
    dtype: Dtype = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description=f"{DEVICE_HELP} (auto: CUDA when it is there)")
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    scoring: ScoringConfig = ScoringConfig()
    cost: CostConfig = CostConfig()
    heal: Optional[HealConfig] = Field(None, description="distill the pruned model from the original after the "
                                       "search (rtk prune)")
    select: Optional[SelectConfig] = Field(None, description="propose plans from several families and criteria, "
                                           "heal the finalists briefly and keep the best (rtk.prune.select)")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError(f"'{v}' is not one of {', '.join(DEVICES)}")
        return v

    @model_validator(mode="after")
    def _heal_text(self):
        clash = self.heal is not None and evaluation_clash(self.heal.data, self.data.evaluation)
        if clash:
            raise ValueError(f"heal.data and data.evaluation use the same text ({clash}); {HEAL_TEXT_RULE}")
        return self

    @model_validator(mode="after")
    def _criterion_workers(self):
        if not CRITERIA[self.search.criterion].ray and self.scoring.workers > 1:
            raise ValueError(f"search.criterion: {self.search.criterion} is not supported with scoring.workers > 1 "
                             "(Ray); use one worker")
        return self

    @model_validator(mode="after")
    def _select(self):
        sel, ev = self.select, self.data.evaluation
        if sel is None:
            return self
        if same_text(judge_text(sel), ev):
            raise ValueError(f"select.judge and data.evaluation use the same text ({text_name(ev)}); finalists are "
                             "judged on held-out calibration text, never the evaluation text")
        clash = evaluation_clash(sel.heal.data, ev)
        if clash:
            raise ValueError(f"select.heal.data and data.evaluation use the same text ({clash}); {HEAL_TEXT_RULE}")
        t = self.search.target
        if t.params_removed is None and t.speedup is None:
            raise ValueError(f"select: needs search.target params_removed or speedup (a budget every family is held "
                             f"to), got {t.describe()}")
        if self.scoring.offload == "disk":
            raise ValueError("select: heals its finalists in memory; scoring.offload: disk never holds the model")
        if self.search.criterion != "ppl":
            raise ValueError("search.criterion: select: names its criteria in select.criteria; leave search.criterion "
                             "at ppl")
        alone = [c for c in sel.criteria if not CRITERIA[c].ray]
        if alone and self.scoring.workers > 1:
            raise ValueError(f"select.criteria: {', '.join(alone)} is not supported with scoring.workers > 1 (Ray); "
                             "use one worker")
        return self

    def fingerprint(self) -> str:
        """What must match for a resume: everything that changes the plan (not the scoring engine, not where
        it runs, not the healing after it; the dtype once resolved, since float16 and float32 scores differ)."""
        return fingerprint(self.plan_settings())

    def plan_settings(self) -> dict:
        """The recipe without what cannot change a plan: the evaluation text, the scoring engine, where it runs,
        the healing after it."""
        d = self.model_dump(mode="json")
        d["data"].pop("evaluation", None)
        for k in ("scoring", "device", "heal"):
            d.pop(k, None)
        if d.get("select") is None:  # added later: a recipe without it keeps its fingerprint
            d.pop("select", None)
        # keys added later, at their defaults, are left out: a recipe from before keeps its fingerprint
        if d["search"]["target"].get("speedup") is None:
            d["search"]["target"].pop("speedup", None)
        if d["search"]["target"].get("count") == "all":
            d["search"]["target"].pop("count", None)
        if d["search"].get("rescoring") == "full":
            d["search"].pop("rescoring")
        if d["search"].get("criterion") == "ppl":
            d["search"].pop("criterion")
        for k, v in COST_KEYS_ADDED.items():
            if d["cost"].get(k) == v:
                d["cost"].pop(k, None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RtkError(f"{where}: expected a mapping of keys (model, data, search, ...), got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RtkError(format_errors(exc, where)) from None


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
