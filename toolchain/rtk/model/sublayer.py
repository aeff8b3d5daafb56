"""What a sublayer is, in one place, and the one value for the sublayers a model lacks, with every way rtk
writes that down. Torch-free: deploy reads configs through here without loading torch.

A name is `attn.N`, `mlp.N`, or `layer.N` for both; `sublayer_name` makes them. A `RemovedSet` is the
attentions and MLPs a model lacks, in model order; its codec reads and writes each encoding of it:
- plan.json's `removed_sublayers` names (`RemovedSet.of`, `.names`);
- DeciLM / nemotron-nas `block_configs` no-op flags (`from_blocks`, `mark_blocks`);
- transformers' `per_layer_config` skip lists (`from_skip_lists`, `skip_lists`);
- the ONNX export's attention list, the layers that keep their attention (`from_attention_layers`,
  `attention_layers`);
and `removed_set(config)` reads it from any config.json or config object rtk writes (export verification, deploy
and the vLLM plugin use it). modeling_rtk, shipped beside weights and self-contained, reads the same encodings
with its own constants (SKIP_NAMES, make_block); tests/test_house.py checks that they agree with these.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Optional

from rtk.errors import RtkError

KINDS = ("attn", "mlp")  # the two sublayers of a layer, in the order they run
NAME = re.compile(r"(attn|mlp|layer)\.(\d+)")
SKIP = {"attn": "attention", "mlp": "mlp"}  # per_layer_config `skip` entry of each kind
BLOCK_PART = {"attn": "attention", "mlp": "ffn"}  # the block_configs entry of each kind
BLOCK_SIZE = {"attn": "n_heads_in_group", "mlp": "intermediate_size"}  # its size key (None where absent)


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

    def split(self) -> tuple["Sublayer", ...]:
        """The sublayers this one removes: both of a layer, else itself."""
        return tuple(Sublayer(self.layer, k) for k in KINDS) if self.kind == "layer" else (self,)

    @property
    def parts(self) -> tuple[str, ...]:
        """The names of the sublayers this name removes: both of a layer, else itself."""
        return tuple(s.name for s in self.split())


def is_name(name) -> bool:
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
    norm in front of it, and the norm after it where the layers have sandwich norms (Gemma 3). The table is
    the model's own (modeling_rtk, which imports torch), read only when a model's weights are asked about."""
    from rtk.model.modeling_rtk import SUBLAYER_MODULES

    return tuple(m for m in SUBLAYER_MODULES[bool(getattr(config, "sandwich_norms", False))][kind] if m)


def owner_prefixes(name: str, config) -> tuple[str, ...]:
    """State-dict key prefixes of a sublayer's weights ('model.layers.3.self_attn.', ...) in a model of `config`."""
    return tuple(f"model.layers.{p.layer}.{m}." for p in Sublayer.parse(name).split() for m in owners(config, p.kind))


def owner_modules(layer, kind: str) -> list:
    """The modules of one decoder layer (rtk's class) that a sublayer of `kind` owns (absent ones left out)."""
    return [m for m in (getattr(layer, a, None) for a in layer.names[kind] if a) if m is not None]


@dataclass(frozen=True)
class RemovedSet:
    """The attentions and MLPs a model lacks, in model order (a whole layer is both of its sublayers)."""

    sublayers: tuple[Sublayer, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sublayers", tuple(sorted({p for s in self.sublayers for p in s.split()})))

    @classmethod
    def of(cls, names: Iterable[str], field: str = "plan") -> "RemovedSet":
        """From names (plan.json's list; `layer.N` counts as both sublayers); a bad name names `field`."""
        return cls(tuple(Sublayer.parse(n, field) for n in names))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sublayers]

    @cached_property
    def _members(self) -> frozenset:
        return frozenset(self.sublayers)

    def lacks(self, kind: str, layer: int) -> bool:
        """The model lacks sublayer `kind` ('attn' | 'mlp') of `layer`."""
        return Sublayer(layer, kind) in self._members

    def __contains__(self, name) -> bool:
        """'attn.3' in removed (a name or a Sublayer); 'layer.3' when both of layer 3's sublayers are."""
        s = Sublayer.parse(name) if isinstance(name, str) else name
        return all(p in self._members for p in s.split())

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.sublayers)

    def whole_layers_only(self) -> bool:
        """Every layer that lacks a sublayer lacks both (the standard layout: fewer layers)."""
        return all(self.lacks(k, s.layer) for s in self.sublayers for k in KINDS)

    def first_blocker(self, layers: int) -> Optional[Sublayer]:
        """The MLP that runs before any attention, or None. vLLM's DeciLM layer starts its residual stream in the
        first attention; when the first sublayer that exists is an MLP, the first request crashes there."""
        for i in range(layers):
            if not self.lacks("attn", i):
                return None
            if not self.lacks("mlp", i):
                return Sublayer(i, "mlp")
        return None

    # ---- block_configs (DeciLM / nemotron-nas) ----------------------------------------------------------------
    @classmethod
    def from_blocks(cls, blocks, where: str = "config") -> "RemovedSet":
        """The sublayers `block_configs` entries mark `no_op`."""
        if not isinstance(blocks, (list, tuple)):
            raise RtkError(f"{where}: 'block_configs' must list one entry per layer")
        out = []
        for i, block in enumerate(blocks):
            for kind, part in BLOCK_PART.items():
                entry = block.get(part) if isinstance(block, dict) else None
                if not isinstance(entry, dict) or not isinstance(entry.get("no_op"), bool):
                    raise RtkError(f"{where}: block_configs[{i}].{part}.no_op must be true or false")
                out += [Sublayer(i, kind)] * entry["no_op"]
        return cls(tuple(out))

    def mark_blocks(self, blocks, where: str = "plan") -> list[dict]:
        """Copies of `block_configs` entries with this set's sublayers marked absent as well (`no_op`, size None).
        A sublayer past the last layer, or one already absent, is an RtkError naming `where`."""
        out = [json.loads(json.dumps(b)) for b in blocks]
        for s in self.sublayers:  # in model order: the first bad name is the one reported
            if s.layer >= len(out):
                raise RtkError(f"{where}: '{s}' names layer {s.layer}, but the model has {len(out)} layers")
            part = out[s.layer][BLOCK_PART[s.kind]]
            if part["no_op"]:
                raise RtkError(f"{where}: '{s}' is already absent from the model")
            part["no_op"] = True
            part.pop(BLOCK_SIZE[s.kind], None)  # re-added last, as the block of a config written by rtk always had it
            part[BLOCK_SIZE[s.kind]] = None
        return out

    # ---- per_layer_config skip lists (transformers) ----------------------------------------------------------
    def skip_lists(self) -> dict[int, dict]:
        """{layer: {"skip": [...]}} for every layer with a removed sublayer (transformers' per_layer_config)."""
        out: dict[int, dict] = {}
        for s in self.sublayers:
            out.setdefault(s.layer, {"skip": []})["skip"].append(SKIP[s.kind])
        return out

    @classmethod
    def from_skip_lists(cls, per_layer: Mapping, layers: int, where: str = "config") -> "RemovedSet":
        """From per_layer_config ({layer or its string: {"skip": [...], other overrides}}); an entry that is not
        a layer below `layers` with a skip list of attention / mlp is an RtkError naming it."""
        kind_of = {entry: kind for kind, entry in SKIP.items()}
        out = []
        for key, over in per_layer.items():
            i = key if isinstance(key, int) else int(key) if str(key).isdigit() else -1
            skip = (over.get("skip") or []) if isinstance(over, dict) else None
            if not 0 <= i < layers or not isinstance(skip, list) or set(skip) - set(kind_of):
                raise RtkError(f"{where}: per_layer_config[{key!r}] must be a layer index below {layers} with a skip "
                               f"list of {' / '.join(SKIP.values())} (got {over!r})")
            out += [Sublayer(i, kind_of[entry]) for entry in skip]
        return cls(tuple(out))

    # ---- the ONNX export's attention list --------------------------------------------------------------------
    def attention_layers(self, layers: int) -> list[int]:
        """The layers that keep their attention (an ONNX graph's KV inputs, in this order)."""
        return [i for i in range(layers) if not self.lacks("attn", i)]

    @classmethod
    def from_attention_layers(cls, kept: Iterable[int], layers: int) -> "RemovedSet":
        """The attentions missing from an attention list (it records attentions only, not MLPs)."""
        kept = set(kept)
        return cls(tuple(Sublayer(i, "attn") for i in range(layers) if i not in kept))


def _per_layer_config(config, layers: int, where: str) -> dict:
    """A config's per_layer_config as {layer: {"skip": [...]}}: config.json's mapping, or a transformers
    config's per-layer views ({} where the config has none)."""
    if isinstance(config, dict):
        plc = config.get("per_layer_config") or {}
        if not isinstance(plc, dict):
            raise RtkError(f"{where}: 'per_layer_config' must map layer indices to overrides")
        return plc
    if not getattr(config, "is_heterogeneous", False):
        return {}
    return {i: {"skip": list(getattr(config.per_layer_config[i], "skip", None) or [])} for i in range(layers)}


def removed_set(config, where: str = "config") -> RemovedSet:
    """The removed set of any config rtk writes, a config.json (dict) or a config object: nemotron-nas by its
    `block_configs`, a standard config by its per_layer_config skip lists (none: nothing is missing from the
    layers it has; the standard layout drops whole layers and renumbers the rest). An ONNX folder's
    config.json also lists the layers that keep attention, which must agree. Errors name `where` and the field."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    layers = get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise RtkError(f"{where}: 'num_hidden_layers' is missing or not a positive integer (got {layers!r})")
    has_blocks = "block_configs" in config if isinstance(config, dict) else get("block_configs") is not None
    if has_blocks:  # nemotron-nas (a config.json with the key must list them)
        blocks = get("block_configs")
        if not isinstance(blocks, (list, tuple)) or len(blocks) != layers:
            raise RtkError(f"{where}: 'block_configs' must list one entry per layer ({layers})")
        removed = RemovedSet.from_blocks(blocks, where)
    else:
        removed = RemovedSet.from_skip_lists(_per_layer_config(config, layers, where), layers, where)
    onnx = get("rtk_onnx")
    if isinstance(onnx, dict) and onnx.get("attention_layers") not in (None, removed.attention_layers(layers)):
        raise RtkError(f"{where}: rtk_onnx.attention_layers {onnx['attention_layers']} disagrees with the layers "
                       f"that keep attention {removed.attention_layers(layers)}")
    return removed
