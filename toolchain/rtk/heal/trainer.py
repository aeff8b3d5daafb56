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
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from tqdm.auto import tqdm

from rtk.errors import RtkError
from rtk.outdir import replace_atomic, write_json_atomic
from rtk.heal.adapters import disable_checkpointing, enable_checkpointing, make_trainable
from rtk.heal.checkpoint import CHECKPOINT, STATE, History, num_or_none, rng_state, set_rng_state
from rtk.heal.loss import CHUNK_ELEMENTS, LayerOutputs, distill_loss, hidden_loss
from rtk.heal.schedule import DataOrder, lr_factor, plan_steps
from rtk.model.params import param_bytes, total_params

if TYPE_CHECKING:  # annotations only: the loop runs without pydantic (bench/scale/gpu_heal.py on a bare GPU machine)
    from rtk.heal.config import HealConfig



class HealPaused(Exception):
    """--max-steps reached: the checkpoint is saved and a rerun continues."""


# ---- memory ------------------------------------------------------------------------------------
def memory_estimate(student, teacher, cfg: HealConfig, seq_len: int) -> int:
    """Bytes training needs, roughly: weights of both models, gradients and AdamW state of what trains,
    and the activations of one micro-batch (per layer ~ 16 x hidden + 4 x intermediate values per token
    kept for the backward pass; the loss keeps one chunk of logits, rtk.heal.loss)."""
    c = student.config
    esize = next(student.parameters()).element_size()
    n_train = total_params(student) if cfg.method == "full" else 0
    tokens = cfg.micro_batch * seq_len
    inter = c.intermediate_size
    per_token = len(student.model.layers) * (16 * c.hidden_size + 4 * inter) * esize
    return param_bytes(student) + param_bytes(teacher) + n_train * (esize + 8) + tokens * per_token + 6 * CHUNK_ELEMENTS * 4


def available_memory(device: str) -> int:
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with vLLM and ray
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ---- the loop -----------------------------------------------------------------------------------
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
        set_rng_state(ck["rng"])
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
              "scheduler": sched.state_dict(), "rng": rng_state()}
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
        hist.steps.append({"step": step, "tokens": step * per_step, "loss": loss_sum, "kl": num_or_none(kl_sum),
                           "ce": num_or_none(ce_sum), **({"hidden": hid_sum} if hooks else {}), "lr": lr, "grad_norm": num_or_none(gnorm)})
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
