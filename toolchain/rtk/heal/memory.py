"""How much memory healing needs per process, from the configs alone (before anything is loaded), and the one line
that refuses a healing that cannot fit, naming what would.

Per process, with N processes sharding (FSDP2): the weights of student and teacher / N; for what trains, its
gradients (the weights' dtype), AdamW's two float32 moments and one float32 temporary of its update / N; the
activations of one micro-batch (not sharded; per layer ~ 16 x hidden + 4 x intermediate values per token kept
for the backward pass, or one hidden state per layer under gradient checkpointing); with N > 1, two decoder
layers gathered whole at a time plus both models' roots (embeddings, final norm, LM head), which stay gathered
from their forward to the loss; and one chunk of logits (rtk.heal.loss). `cpu_offload` moves the sharded part to
CPU memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from rtk.errors import RtkError
from rtk.heal.loss import CHUNK_ELEMENTS
from rtk.model.cost import model_params

if TYPE_CHECKING:
    from rtk.heal.config import HealConfig

GIB = 2 ** 30
LORA_LINEARS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
                "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}


@dataclass(frozen=True)
class Need:
    """Bytes one process needs on its device (`device`) and in CPU memory for sharded state it offloads."""

    device: int
    offloaded: int
    activations: int
    checkpointing: bool


def _dims(config) -> dict:
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"h": config.hidden_size, "q": heads * hd, "kv": config.num_key_value_heads * hd,
            "i": config.intermediate_size}


def trainable_params(config, cfg: "HealConfig") -> int:
    """Parameters that train: the whole student (embeddings / head only with train_embeddings), or its LoRA
    adapters (rank x (in + out) per adapted linear layer that remains; an upper bound: every layer counted)."""
    total = model_params(config)
    if cfg.method == "full":
        if cfg.train_embeddings:
            return total
        return total - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    d = _dims(config)
    per_layer = sum(d[a] + d[b] for t, (a, b) in LORA_LINEARS.items() if t in cfg.lora.targets)
    return config.num_hidden_layers * cfg.lora.rank * per_layer


def layer_params(config) -> int:
    """The largest decoder layer's parameters, roughly (attention + MLP of a full layer)."""
    d = _dims(config)
    return d["h"] * (2 * d["q"] + 2 * d["kv"]) + 3 * d["h"] * d["i"]


def estimate(student_config, teacher_config, cfg: "HealConfig", seq_len: int, element_size: int,
             processes: int = 1, cpu_offload: bool = False, checkpointing: bool = False,
             micro_batch: Optional[int] = None) -> Need:
    """Bytes per process (see the module's doc); `micro_batch`: the blocks one process runs at once."""
    c = student_config
    weights = (model_params(student_config) + model_params(teacher_config)) * element_size
    n_train = trainable_params(student_config, cfg)
    sharded = (weights + n_train * (element_size + 12)) // processes
    tokens = (micro_batch or cfg.micro_batch) * seq_len
    per_token = (c.hidden_size if checkpointing else 16 * c.hidden_size + 4 * c.intermediate_size) * element_size
    acts = tokens * c.num_hidden_layers * per_token
    roots = sum(m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) + m.hidden_size
                for m in (student_config, teacher_config))
    gathered = (2 * layer_params(teacher_config) + roots) * element_size if processes > 1 else 0
    fixed = acts + gathered + 6 * min(CHUNK_ELEMENTS, tokens * c.vocab_size) * 4
    if cpu_offload:
        return Need(fixed, sharded, acts, checkpointing)
    return Need(sharded + fixed, 0, acts, checkpointing)


def available_memory(device: str) -> int:
    """Free bytes on a CUDA device, or available CPU memory."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with vLLM and ray
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def with_checkpointing(student_config, teacher_config, cfg: "HealConfig", seq_len: int, element_size: int,
                       avail: int, **kw) -> Need:
    """The estimate with gradient checkpointing as `cfg.gradient_checkpointing` says: on, off, or auto (on when the
    estimate without it passes 0.8 of `avail`); `kw`: estimate()'s processes, cpu_offload, micro_batch."""
    ck = cfg.gradient_checkpointing == "on"
    n = estimate(student_config, teacher_config, cfg, seq_len, element_size, checkpointing=ck, **kw)
    if not ck and cfg.gradient_checkpointing == "auto" and n.device > 0.8 * avail:
        n = estimate(student_config, teacher_config, cfg, seq_len, element_size, checkpointing=True, **kw)
    return n


def check_fits(student_config, teacher_config, cfg: "HealConfig", element_size: int, device: str, processes: int,
               local_processes: int, micro_batch: int) -> Need:
    """The estimate for this run (gradient checkpointing when auto and needed); one line naming what would fit when
    even sharded, with gradient checkpointing, it does not."""
    kw = dict(seq_len=cfg.data.seq_len, element_size=element_size)
    ck = cfg.gradient_checkpointing == "on"
    cpu = not str(device).startswith("cuda")
    # processes on the CPU share one memory: they need it together (more of them never helps there); rank 0 alone
    # loads the models whole before sharding
    share = local_processes if cpu else 1
    avail = available_memory(device) // share

    def need(**over) -> Need:
        return estimate(student_config, teacher_config, over.pop("cfg", cfg), processes=over.pop("n", processes),
                        cpu_offload=over.pop("off", cfg.cpu_offload), checkpointing=over.pop("ck", ck),
                        micro_batch=over.pop("mb", micro_batch), **kw)

    n = with_checkpointing(student_config, teacher_config, cfg, cfg.data.seq_len, element_size, avail,
                           processes=processes, cpu_offload=cfg.cpu_offload, micro_batch=micro_batch)
    if n.device <= avail:
        return n
    ways = []
    more = None if cpu else next((p for p in (2 ** k for k in range(1, 11))
                                  if p > processes and need(n=p, ck=True).device <= avail), None)
    if more:
        ways.append(f"{more} processes")
    if cfg.method == "full" and need(cfg=cfg.model_copy(update={"method": "lora"}), ck=True).device <= avail:
        ways.append("method: lora")
    if cfg.gradient_checkpointing == "off" and need(ck=True).device <= avail:
        ways.append("gradient_checkpointing: auto")
    if not cpu and not cfg.cpu_offload and need(off=True, ck=True).device <= avail:
        ways.append("cpu_offload: true")
    if micro_batch > 1 and need(ck=True, mb=1).device <= avail:
        ways.append("micro_batch: 1 (with more grad_accum)")
    raise RtkError(f"heal: needs about {n.device / GIB:.1f} GiB per process on {device} ({processes} process"
                   f"{'es' * (processes != 1)}, {cfg.method}, gradient checkpointing {'on' if n.checkpointing else 'off'}"
                   f"), {avail / GIB:.1f} GiB free; " + ("would fit: " + ", or ".join(ways) if ways else
                                                         "nothing rtk can change fits it on this machine"))
