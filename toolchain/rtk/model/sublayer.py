"""What a sublayer is, in one place: its name (`attn.N`, `mlp.N`, or `layer.N` for both), the modules
that own its weights, and the two ways a config records that it is gone (DeciLM `block_configs` no-ops,
transformers' `per_layer_config` skip lists). Every other module parses and writes names through here."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from rtk.errors import RtkError
from rtk.model.modeling_rtk import SKIP_NAMES, SUBLAYER_MODULES

KINDS = ("attn", "mlp")  # the two sublayers of a layer, in the order they run
NAME = re.compile(r"(attn|mlp|layer)\.(\d+)")
# per_layer_config `skip` entry of each kind (the inverse of modeling_rtk's SKIP_NAMES, which reads them)
SKIP = {kind: entry for entry, kind in SKIP_NAMES.items()}
BLOCK_PART = {"attn": "attention", "mlp": "ffn"}  # the block_configs entry of each kind


def sublayer_name(kind: str, layer: int) -> str:
    """The one place a name is made: 'attn.3', 'mlp.3', 'layer.3'."""
    return f"{kind}.{layer}"


@dataclass(frozen=True, order=True)
class Sublayer:
    layer: int
    kind: str  # "attn" | "mlp" | "layer"

    @classmethod
    def parse(cls, name: str, field: str = "plan") -> "Sublayer":
        m = NAME.fullmatch(str(name))
        if m is None:
            raise RtkError(f"{field}: '{name}' is not a sublayer name (attn.N, mlp.N or layer.N)")
        return cls(int(m.group(2)), m.group(1))

    @property
    def name(self) -> str:
        return sublayer_name(self.kind, self.layer)

    def __str__(self) -> str:
        return self.name

    @property
    def parts(self) -> tuple[str, ...]:
        """The sublayers this name removes: both of a layer, else itself."""
        return tuple(sublayer_name(k, self.layer) for k in KINDS) if self.kind == "layer" else (self.name,)


def is_name(name: str) -> bool:
    return NAME.fullmatch(str(name)) is not None


def layer_of(name: str) -> int:
    return Sublayer.parse(name).layer


def expand(names: Iterable[str]) -> set[str]:
    """'layer.i' -> {'attn.i', 'mlp.i'}; sublayer names pass through."""
    return {p for n in names for p in Sublayer.parse(n).parts}


def model_order(names: Iterable[str]) -> list[str]:
    """Names sorted by layer, then kind (attn before mlp)."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def owners(config, kind: str) -> tuple[str, ...]:
    """The modules whose weights belong to a sublayer of `kind` in a model of `config`: its branch and the
    norm in front of it, and the norm after it where the layers have sandwich norms (Gemma 3)."""
    return tuple(m for m in SUBLAYER_MODULES[bool(getattr(config, "sandwich_norms", False))][kind] if m)


def owner_prefixes(name: str, config) -> tuple[str, ...]:
    """State-dict key prefixes of a sublayer's weights ('model.layers.3.self_attn.', ...) in a model of `config`."""
    s = Sublayer.parse(name)
    kinds = KINDS if s.kind == "layer" else (s.kind,)
    return tuple(f"model.layers.{s.layer}.{m}." for k in kinds for m in owners(config, k))


def owner_modules(layer, kind: str) -> list:
    """The modules of one decoder layer (rtk's class) that a sublayer of `kind` owns (absent ones left out)."""
    return [m for m in (getattr(layer, a, None) for a in layer.names[kind] if a) if m is not None]


def removed_sublayers(config) -> list[str]:
    """The sublayers a config's block_configs mark absent, in model order."""
    out = []
    for i, b in enumerate(config.block_configs):
        out += [f"{k}.{i}" for k in KINDS if b[BLOCK_PART[k]]["no_op"]]
    return out


def per_layer_skips(config) -> dict:
    """{layer: {"skip": [...]}} for every layer with a removed sublayer (transformers' per_layer_config)."""
    out: dict[int, dict] = {}
    for name in removed_sublayers(config):
        s = Sublayer.parse(name)
        out.setdefault(s.layer, {"skip": []})["skip"].append(SKIP[s.kind])
    return out


def first_sublayer_blocker(blocks) -> str | None:
    """The MLP that runs before any attention in `block_configs` entries (dicts), or None.

    vLLM's DeciLM layer starts its residual stream in the first attention; when the first sublayer
    that exists is an MLP, the residual is still None there and the first request crashes."""
    for i, b in enumerate(blocks):
        if not (b.get("attention") or {}).get("no_op"):
            return None
        if not (b.get("ffn") or {}).get("no_op"):
            return f"mlp.{i}"
    return None
