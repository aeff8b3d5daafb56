"""Every export checks itself: reload what was written and compare logits on fresh shapes, and read the written
config.json back as deploy and rtk's vLLM plugin read it.

The probe batch has shapes used nowhere else in rtk (batch 2, odd length 13, the second row left-padded
by 5 tokens), and the comparison runs in float32: the references are rounded to the exported dtype
first, so a bfloat16 export is checked against exactly the weights it should hold, and any difference
left is arithmetic noise (tolerance: 1e-4 of the largest reference logit, at least 1e-4).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from rtk.errors import RtkError
from rtk.model.load import read_config
from rtk.model.sublayer import RemovedSet, removed_set

PROBE_BATCH, PROBE_LEN, PROBE_PAD = 2, 13, 5
REL_TOL = 1e-4


def probe_inputs(vocab_size: int, seed: int = 20240607) -> dict:
    """input_ids / attention_mask / position_ids of the probe batch (left padding, pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (PROBE_BATCH, PROBE_LEN), generator=g)
    mask = torch.ones(PROBE_BATCH, PROBE_LEN, dtype=torch.long)
    mask[1, :PROBE_PAD] = 0
    ids[1, :PROBE_PAD] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


def as_float32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its weights rounded to `dtype` and run in float32 (a copy unless nothing changes)."""
    if dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    m = copy.deepcopy(model).to(dtype).to(torch.float32)
    if hasattr(m, "model") and hasattr(m.model, "inv_freq"):  # rope frequencies stay float32
        m.model.inv_freq = model.model.inv_freq.float()
    return m


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict, skip: Iterable[str] = ()) -> torch.Tensor:
    """Logits at the non-padded positions, float32, shape [n_tokens, vocab]."""
    kw = {"skip": frozenset(skip)} if skip else {}
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False, **kw).logits.float().cpu()
    return out[inputs["attention_mask"].bool()]


@dataclass
class Check:
    name: str
    max_diff: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tol


@dataclass
class Verification:
    checks: list[Check] = field(default_factory=list)
    shape: str = f"batch {PROBE_BATCH} x {PROBE_LEN} tokens, row 2 left-padded by {PROBE_PAD}, float32"

    def add(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        tol = max(REL_TOL, REL_TOL * want.abs().max().item())
        self.checks.append(Check(name, (got - want).abs().max().item(), tol))

    def raise_on_mismatch(self, where: str) -> None:
        bad = [c for c in self.checks if not c.ok]
        if bad:
            raise RtkError(f"{where}: export verification failed: " + "; ".join(
                f"logits of the reloaded model differ from {c.name} by {c.max_diff:.3g} (tolerance {c.tol:.3g})"
                for c in bad))

    def lines(self) -> list[str]:
        return [f"max |logit difference| vs {c.name}: {c.max_diff:.2e} (tolerance {c.tol:.1e})"
                for c in self.checks]


def verify(reloaded: torch.nn.Module, pruned: torch.nn.Module, dtype: torch.dtype,
           original: Optional[torch.nn.Module] = None, skip: Iterable[str] = ()) -> Verification:
    """Compare the reloaded export with the in-memory pruned model and, when given, the original model
    with `skip` bypassed at run time."""
    inputs = probe_inputs(pruned.config.vocab_size)
    got = logits(reloaded, inputs)
    v = Verification()
    v.add("the in-memory pruned model", got, logits(as_float32(pruned, dtype), inputs))
    if original is not None:
        v.add("the original model run with the removed sublayers skipped", got,
              logits(as_float32(original, dtype), inputs, skip))
    return v


def check_removed(out: Path, removed: RemovedSet, layout: str) -> None:
    """The written config.json, read by `removed_set` (as rtk deploy and rtk's vLLM plugin read it), lacks the
    sublayers the model lacks; a standard layout's config (the removed layers gone, the rest renumbered) lacks none."""
    written = removed_set(read_config(out), "export: the written config.json")
    want = RemovedSet() if layout == "standard" else removed
    if written != want:
        raise RtkError(f"export: the written config.json reads as lacking {written.names}, but the model lacks "
                       f"{want.names} ({layout} layout)")


def reload_written(out: Path, layout: str):
    """The written folder, loaded the way its users load it (fails on any missing/unexpected weight):
    standard and per_layer_config folders by AutoModelForCausalLM (the latter with the folder's own
    modeling_rtk.py, trust_remote_code), DeciLM folders by rtk's class."""
    from transformers import AutoModelForCausalLM

    from rtk.export.layouts import LAYOUTS
    from rtk.model.modeling_rtk import RtkDeciLMForCausalLM

    cls, kw = {"transformers": (AutoModelForCausalLM, {}),
               "remote-code": (AutoModelForCausalLM, {"trust_remote_code": True}),
               "rtk": (RtkDeciLMForCausalLM, {})}[LAYOUTS[layout].loads_with]
    try:
        m, info = cls.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True, **kw)
    except Exception as exc:
        raise RtkError(f"export: the written folder does not load ({type(exc).__name__}: {exc})") from None
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RtkError(f"export: the written folder loads with {bad}")
    return m.eval()
