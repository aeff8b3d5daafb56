"""Candidates of a search (every sublayer or whole layer still present) and parameter counts."""
from __future__ import annotations

from rtk.model.modeling_rtk import RtkDeciLMForCausalLM
from rtk.model.params import param_count
from rtk.model.sublayer import owner_modules, sublayer_name
from rtk.prune.search import Candidate


def candidates(model: RtkDeciLMForCausalLM, kind: str = "sublayers", protect=(), cost_fn=None) -> list[Candidate]:
    """Every sublayer (or whole layer) still present, in model order, minus the protected ones."""
    out = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = (sum(param_count(m) for m in owner_modules(layer, k)) for k in ("attn", "mlp"))
        if kind == "blocks":
            items = [("layer", attn + mlp)] if (attn or mlp) else []
        else:
            items = [("attn", attn)] * bool(attn) + [("mlp", mlp)] * bool(mlp)
        for k, params in items:
            c = Candidate(name=sublayer_name(k, i), layer=i, kind=k, params=params)
            if cost_fn is not None:
                c = Candidate(name=c.name, layer=i, kind=k, params=params, cost=cost_fn(c))
            out.append(c)
    protected = set(protect)
    return [c for c in out if c.name not in protected and not (set(c.parts) & protected)
            and sublayer_name("layer", c.layer) not in protected]


def existing_names(model: RtkDeciLMForCausalLM) -> set[str]:
    names = set()
    for i, layer in enumerate(model.model.layers):
        names.add(sublayer_name("layer", i))
        if layer.self_attn is not None:
            names.add(sublayer_name("attn", i))
        if layer.mlp is not None:
            names.add(sublayer_name("mlp", i))
    return names
