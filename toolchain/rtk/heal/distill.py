"""The distillation loop: a pruned student learns the original teacher's next-token distributions.

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + ce_weight * CE(student, text)

over every position of every token block (forward KL, as torchtune's KD recipes and NeMo's logit
distillation; the T^2 keeps gradient sizes comparable across temperatures). AdamW, linear warm-up then
cosine decay to `lr * min_lr`, micro-batches with gradient accumulation, gradient clipping.

`method: full` trains every weight of the student (the token embeddings / LM head unless
`train_embeddings: false`); `method: lora` puts peft LoRA adapters on the remaining linear layers and
merges them into the weights at the end, so the result has exactly the student's shapes.

Resumable: every `checkpoint_every` optimizer steps the trainable weights, optimizer, scheduler, RNG
and the step (which fixes the data position: block order is a seeded permutation per pass over the
text) are written to the state folder; a rerun continues and ends with the same weights as a run that
was never stopped.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from tqdm.auto import tqdm

from ..errors import RtkError
from ..outdir import replace_atomic, write_json_atomic
from .loss import CHUNK_ELEMENTS, distill_loss

if TYPE_CHECKING:  # annotations only: the loop runs without pydantic (bench/scale/gpu_heal.py on a bare GPU machine)
    from ..recipe import HealConfig

CHECKPOINT = "checkpoint.pt"
STATE = "heal_state.json"


class HealPaused(Exception):
    """--max-steps reached: the checkpoint is saved and a rerun continues."""


# ---- pieces -------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int, warmup: float, min_lr: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `steps`: linear warm-up
    over the first `warmup` fraction, then cosine from 1 down to `min_lr`."""
    n_warm = int(round(warmup * steps))
    if step < n_warm:
        return (step + 1) / (n_warm + 1)
    span = max(1, steps - n_warm - 1)
    progress = min(1.0, (step - n_warm) / span)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class DataOrder:
    """Which block each training sample is: sample i is block perm_e[i % n] of pass e = i // n over the
    pool, each pass a permutation seeded by (seed, e). A pure function of i: a resumed run reads on
    exactly where the stopped one would have."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + count)]


def plan_steps(cfg: HealConfig, seq_len: int) -> tuple[int, int]:
    """(optimizer steps, tokens per step) for the budget."""
    per_step = cfg.micro_batch * cfg.grad_accum * seq_len
    return max(1, math.ceil(cfg.tokens / per_step)), per_step


# ---- memory and gradient checkpointing ----------------------------------------------------------
def memory_estimate(student, teacher, cfg: HealConfig, seq_len: int) -> int:
    """Bytes training needs, roughly: weights of both models, gradients and AdamW state of what trains,
    and the activations of one micro-batch (per layer ~ 16 x hidden + 4 x intermediate values per token
    kept for the backward pass; the loss keeps one chunk of logits, rtk.heal.loss)."""
    def size(m):
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())

    c = student.config
    esize = next(student.parameters()).element_size()
    n_train = sum(p.numel() for p in student.parameters()) if cfg.method == "full" else 0
    tokens = cfg.micro_batch * seq_len
    inter = c.intermediate_size
    per_token = len(student.model.layers) * (16 * c.hidden_size + 4 * inter) * esize
    return size(student) + size(teacher) + n_train * (esize + 8) + tokens * per_token + 6 * CHUNK_ELEMENTS * 4


def available_memory(device: str) -> int:
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with vLLM and ray
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


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


# ---- full fine-tuning or LoRA -------------------------------------------------------------------
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
        raise RtkError("heal.method: lora needs peft (pip install rtk[heal])") from None
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


# ---- intermediate states ----------------------------------------------------------------------
class LayerOutputs:
    """Collects the residual stream after each decoder layer of a model while it runs (forward hooks)."""

    def __init__(self, model):
        self.out: list[torch.Tensor] = []
        self.on = False  # records only between start() and take(): evaluation passes are not kept
        self._hooks = [layer.register_forward_hook(self._keep) for layer in model.model.layers]

    def _keep(self, _module, _args, output):
        if self.on:
            self.out.append(output)

    def start(self) -> None:
        self.out, self.on = [], True

    def take(self) -> list[torch.Tensor]:
        out, self.out, self.on = self.out, [], False
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def hidden_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of ||h_student - h_teacher||^2 / ||h_teacher||^2 (each token's residual
    stream against the teacher's after the same layer; the pruned model keeps every layer, so they line up)."""
    if len(student_states) != len(teacher_states):
        raise RtkError(f"heal.hidden_weight: the student runs {len(student_states)} layers, the teacher "
                       f"{len(teacher_states)}: intermediate states need the same layer count (set it to 0)")
    total = 0.0
    for hs, ht in zip(student_states, teacher_states):
        ht = ht.float()
        total = total + ((hs.float() - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / len(student_states)


# ---- the loop -----------------------------------------------------------------------------------
@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # per optimizer step: tokens, loss, kl, ce, lr, grad_norm
    evals: list[dict] = field(default_factory=list)  # {step, tokens, ppl}
    train_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "train_seconds": self.train_seconds}

    @classmethod
    def from_json(cls, d: dict) -> "History":
        return cls(list(d["steps"]), list(d["evals"]), float(d["train_seconds"]))


def _num(x: float) -> Optional[float]:
    """JSON has no NaN: a term that is not computed is null."""
    return None if math.isnan(x) else x


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def distill(student, teacher, blocks: torch.Tensor, cfg: HealConfig, state_dir: Optional[Path],
            fingerprint: str, *, progress: bool = True, echo: Callable[[str], None] = print,
            evaluate: Optional[Callable[[torch.nn.Module], float]] = None,
            max_steps: Optional[int] = None) -> tuple[torch.nn.Module, dict]:
    """Train `student` (rtk model class, modified in place) towards `teacher` on `blocks` [n, seq_len] with
    `cfg`; returns (healed student with plain weights, record). `state_dir` holds checkpoints (None: none);
    `evaluate(model) -> PPL` is called every `eval_every` steps. `max_steps`: pause (HealPaused) after that
    many steps of this call, checkpoint saved."""
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    if dtype == torch.float16:
        raise RtkError("dtype: float16 cannot train without loss scaling; heal in bfloat16 (CUDA) or float32")
    n_blocks, seq_len = blocks.shape
    steps, per_step = plan_steps(cfg, seq_len)
    order = DataOrder(n_blocks, cfg.seed)

    need, avail = memory_estimate(student, teacher, cfg, seq_len), available_memory(str(device))
    ckpt = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and need > 0.8 * avail)
    if ckpt:
        enable_checkpointing(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    tr = make_trainable(student, cfg)
    opt = torch.optim.AdamW(list(tr.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup, cfg.min_lr))
    hist, step = History(), 0

    state_file = state_dir / STATE if state_dir else None
    if state_file is not None and (state_dir / CHECKPOINT).is_file():
        ck = torch.load(state_dir / CHECKPOINT, map_location=device, weights_only=False)
        if ck.get("fingerprint") != fingerprint:
            raise RtkError(f"{state_dir}: holds an unfinished healing with other settings; remove it to start over")
        with torch.no_grad():
            for n, p in tr.params.items():
                p.copy_(ck["params"][n])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        step, hist = ck["step"], History.from_json(ck["history"])  # the checkpoint is the authority
        echo(f"rtk: heal: resuming {state_dir} at step {step} of {steps}")
    else:
        torch.manual_seed(cfg.seed + 1)  # LoRA dropout draws; identical for a fresh and a resumed run

    def save():
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_file, {"fingerprint": fingerprint, "step": step, "steps": steps})
        ck = {"fingerprint": fingerprint, "step": step, "history": hist.to_json(),
              "params": {n: p.detach().cpu() for n, p in tr.params.items()}, "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "rng": _rng_state()}
        replace_atomic(state_dir / CHECKPOINT, lambda p: torch.save(ck, p))

    def run_eval():
        if evaluate is None:
            return
        tr.forward.eval()
        ppl = evaluate(tr.forward)
        tr.forward.train()
        hist.evals.append({"step": step, "tokens": step * per_step, "ppl": ppl})

    hooks = (LayerOutputs(teacher), LayerOutputs(tr.forward)) if cfg.hidden_weight else None
    tr.forward.train()
    started_at = step
    bar = tqdm(total=steps, initial=step, desc="healing", unit="step", disable=not progress, leave=False)
    while step < steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        first = step * cfg.micro_batch * cfg.grad_accum
        loss_sum = kl_sum = ce_sum = hid_sum = 0.0
        for m in range(cfg.grad_accum):
            idx = order.indices(first + m * cfg.micro_batch, cfg.micro_batch)
            ids = blocks[idx].to(device)
            if hooks is not None:
                hooks[0].start(), hooks[1].start()
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=ids)
            hidden = tr.forward.model(input_ids=ids)  # final normed hidden states; the heads run in the loss
            loss, kl, ce = distill_loss(hidden, tr.forward.lm_head.weight, t_hidden, teacher.lm_head.weight, ids,
                                        cfg.kl_weight, cfg.ce_weight, cfg.temperature)
            if hooks is not None:
                hs = hidden_loss(hooks[1].take(), hooks[0].take())
                loss = loss + cfg.hidden_weight * hs
                hid_sum += hs.item() / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
            del hidden, t_hidden
            loss_sum += loss.item() / cfg.grad_accum
            kl_sum += kl / cfg.grad_accum
            ce_sum += ce / cfg.grad_accum
        gnorm = math.nan
        if cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(list(tr.params.values()), cfg.max_grad_norm))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        hist.train_seconds += dt
        hist.steps.append({"step": step, "tokens": step * per_step, "loss": loss_sum, "kl": _num(kl_sum),
                           "ce": _num(ce_sum), **({"hidden": hid_sum} if hooks else {}), "lr": lr, "grad_norm": _num(gnorm)})
        bar.update()
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{per_step / dt:.0f}")
        if cfg.eval_every and evaluate is not None and (step % cfg.eval_every == 0 or step == steps):
            run_eval()
        if step % cfg.checkpoint_every == 0 or step == steps:
            save()
        if max_steps is not None and step < steps and step - started_at >= max_steps:
            save()
            bar.close()
            raise HealPaused(f"rtk: heal: paused after {max_steps} step(s) at step {step} of {steps}; state in "
                             f"{state_dir}; rerun the same command to continue")
    bar.close()
    if hooks is not None:
        for hk in hooks:
            hk.remove()
    tr.forward.eval()
    for p in tr.params.values():
        p.requires_grad_(False)
    healed = tr.finish()
    if ckpt:
        disable_checkpointing(healed)
    for p in healed.parameters():
        p.requires_grad_(False)
    healed.eval()
    last = hist.steps[-max(1, len(hist.steps) // 10):]
    record = {
        "steps": steps, "tokens_per_step": per_step, "tokens": steps * per_step, "blocks": n_blocks,
        "passes": steps * per_step / (n_blocks * seq_len),
        "trainable_params": tr.n_trainable, "gradient_checkpointing": ckpt,
        "memory_estimate_bytes": need, "memory_available_bytes": avail,
        "train_seconds": round(hist.train_seconds, 1),
        "tokens_per_second": steps * per_step / hist.train_seconds if hist.train_seconds else math.nan,
        "loss_first": hist.steps[0]["loss"], "loss_last": sum(s["loss"] for s in last) / len(last),
        "history": hist.to_json(),
    }
    return healed, record
