"""Candidates of a search (every sublayer or whole layer still present) and parameter counts."""
from __future__ import annotations

from ..modeling_rtk import RtkDeciLMForCausalLM
from ..search import Candidate


def param_count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def total_params(model: RtkDeciLMForCausalLM) -> int:
    """All parameters, a tied embedding/head counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def candidates(model: RtkDeciLMForCausalLM, kind: str = "sublayers", protect=(), cost_fn=None) -> list[Candidate]:
    """Every sublayer (or whole layer) still present, in model order, minus the protected ones."""
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = param_count(layer.self_attn) + param_count(layer.input_layernorm)
        mlp = param_count(layer.mlp) + param_count(layer.post_attention_layernorm)
        if kind == "blocks":
            items = [(f"layer.{i}", "layer", attn + mlp)] if (attn or mlp) else []
        else:
            items = [(f"attn.{i}", "attn", attn)] * bool(attn) + [(f"mlp.{i}", "mlp", mlp)] * bool(mlp)
        for name, k, params in items:
            c = Candidate(name=name, layer=i, kind=k, params=params)
            if cost_fn is not None:
                c = Candidate(name=name, layer=i, kind=k, params=params, cost=cost_fn(c))
            out.append(c)
    protected = set(protect)
    return [c for c in out if c.name not in protected and not (set(c.parts) & protected)
            and f"layer.{c.layer}" not in protected]


def existing_names(model: RtkDeciLMForCausalLM) -> set[str]:
    names = set()
    for i, layer in enumerate(model.model.layers):
        names.add(f"layer.{i}")
        if layer.self_attn is not None:
            names.add(f"attn.{i}")
        if layer.mlp is not None:
            names.add(f"mlp.{i}")
    return names
