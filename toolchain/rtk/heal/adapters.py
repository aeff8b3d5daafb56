"""What trains: the whole student (`method: full`, embeddings frozen unless asked) or peft LoRA adapters on its
remaining linear layers (`method: lora`, merged at the end), and gradient checkpointing of its layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from rtk import pip_install
from rtk.errors import RtkError

if TYPE_CHECKING:  # annotations only: the loop runs without pydantic (bench/scale/gpu_heal.py on a bare GPU machine)
    from rtk.heal.config import HealConfig


def enable_checkpointing(model) -> None:
    """Recompute every decoder layer in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        if getattr(layer, "_rtk_checkpointed", False):
            continue
        fwd = layer.forward

        def ck(*args, _fwd=fwd, **kw):
            return checkpoint(_fwd, *args, use_reentrant=False, **kw) if torch.is_grad_enabled() else _fwd(*args, **kw)

        layer.forward = ck
        layer._rtk_checkpointed = True


def disable_checkpointing(model) -> None:
    for layer in model.model.layers:
        if getattr(layer, "_rtk_checkpointed", False):
            del layer.forward
            del layer._rtk_checkpointed


@dataclass
class Trainable:
    """The model the loop runs (`forward`), the parameters it trains, and how to get the plain student back."""

    forward: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    finish: Callable[[], torch.nn.Module]
    peft_model: Optional[object] = None
    n_trainable: int = 0


def make_trainable(student, cfg: HealConfig) -> Trainable:
    if cfg.method == "full":
        for n, p in student.named_parameters():
            p.requires_grad_(cfg.train_embeddings or not n.startswith(("model.embed_tokens.", "lm_head.")))
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        return Trainable(student, params, lambda: student, None, sum(p.numel() for p in params.values()))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RtkError(f"heal.method: lora needs peft ({pip_install('heal')})") from None
    present = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in cfg.lora.targets if t in present]
    if not targets:
        raise RtkError(f"heal.lora.targets: none of {', '.join(cfg.lora.targets)} remains in the pruned model")
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn here
    pm = get_peft_model(student, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                            lora_dropout=cfg.lora.dropout, target_modules=targets, bias="none"))
    base = pm.base_model.model  # the student itself, its linear layers wrapped by LoRA layers
    params = {n: p for n, p in base.named_parameters() if p.requires_grad}

    def finish():
        return pm.merge_and_unload()

    return Trainable(base, params, finish, pm, sum(p.numel() for p in params.values()))
