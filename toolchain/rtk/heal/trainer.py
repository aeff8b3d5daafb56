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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from tqdm.auto import tqdm

from rtk.errors import RtkError
from rtk.heal.adapters import disable_checkpointing, enable_checkpointing, make_trainable
from rtk.heal.checkpoint import (STATE, History, load_checkpoint, load_meta, num_or_none, rng_state,
                                 save_checkpoint, saved_checkpoint, set_rng_state)
from rtk.heal.distributed import full_state_dict, materialize, mean_over_ranks, share, shard
from rtk.heal.memory import available_memory
from rtk.heal.loss import CHUNK_ELEMENTS, LayerOutputs, distill_loss, hidden_loss
from rtk.heal.schedule import Pool, lr_factor, plan_steps
from rtk.model.params import param_bytes, total_params

if TYPE_CHECKING:  # annotations only: the loop runs without pydantic (bench/scale/gpu_heal.py on a bare GPU machine)
    from rtk.heal.config import HealConfig
    from rtk.heal.distributed import World

__all__ = ["HealPaused", "STATE", "distill", "gather", "memory_estimate", "available_memory", "sharded_ppl"]


class HealPaused(Exception):
    """--max-steps reached: the checkpoint is saved and a rerun continues."""


# ---- memory ------------------------------------------------------------------------------------
def memory_estimate(student, teacher, cfg: HealConfig, seq_len: int) -> int:
    """Bytes one process trains with, roughly: weights of both models, gradients and AdamW state of what trains,
    and the activations of one micro-batch (per layer ~ 16 x hidden + 4 x intermediate values per token
    kept for the backward pass; the loss keeps one chunk of logits, rtk.heal.loss). rtk.heal.memory estimates
    from the configs, sharded, before anything is loaded."""
    c = student.config
    esize = next(student.parameters()).element_size()
    n_train = total_params(student) if cfg.method == "full" else 0
    tokens = cfg.micro_batch * seq_len
    inter = c.intermediate_size
    per_token = len(student.model.layers) * (16 * c.hidden_size + 4 * inter) * esize
    return param_bytes(student) + param_bytes(teacher) + n_train * (esize + 8) + tokens * per_token + 6 * CHUNK_ELEMENTS * 4


def sharded_ppl(model, evaluate: Callable[[torch.nn.Module], float]) -> float:
    """evaluate(model) on a model FSDP shards (every rank together): the root's weights gathered around it, as
    rtk.model.ppl reads the embeddings and the head directly; a plain model is evaluated as it is."""
    from rtk.heal.distributed import is_sharded

    if not is_sharded(model):
        return evaluate(model)
    model.unshard()
    try:
        return evaluate(model)
    finally:
        model.reshard()


# ---- the loop -----------------------------------------------------------------------------------
def distill(student, teacher, blocks, cfg: HealConfig, state_dir: Optional[Path],
            fingerprint: str, *, progress: bool = True, echo: Callable[[str], None] = print,
            evaluate: Optional[Callable[[torch.nn.Module], float]] = None,
            max_steps: Optional[int] = None, world: Optional[World] = None,
            measure_before: bool = False, measure_after: bool = False, sharded_need=None) -> tuple[torch.nn.Module, dict]:
    """Train `student` (rtk model class, modified in place) towards `teacher` on `blocks` ([n, seq_len] token ids,
    or a rtk.heal.blocks source) with `cfg`; returns (healed student, record). `state_dir` holds checkpoints
    (None: none); `evaluate(model) -> PPL` is called every `eval_every` steps. `max_steps`: pause (HealPaused)
    after that many steps of this call, checkpoint saved.

    `world` (several processes): student and teacher are sharded with FSDP2 over the ranks (rank 0's weights sent
    to all: the other ranks may hold meta-device skeletons), each rank reads its share of every global batch, and
    the healed student returned is still sharded (gather() makes it whole);
    `measure_before` / `measure_after`: the record gets `ppl_before` / `ppl_after` from `evaluate` on the sharded
    model (the PPL before is kept in the checkpoints);
    `sharded_need`: rtk.heal.memory's estimate per process (it decides gradient checkpointing)."""
    device = torch.device(world.device) if world else next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    if dtype == torch.float16:
        raise RtkError("dtype: float16 cannot train without loss scaling; heal in bfloat16 (CUDA) or float32")
    data = blocks if hasattr(blocks, "batch") else Pool(blocks, cfg.seed)
    n_blocks, seq_len = data.n_blocks, data.seq_len
    steps, per_step = plan_steps(cfg, seq_len)
    sh = share(cfg.micro_batch, cfg.grad_accum, world)
    main = world is None or world.main

    if world is None:
        need, avail = memory_estimate(student, teacher, cfg, seq_len), available_memory(str(device))
        ckpt = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and need > 0.8 * avail)
    else:  # rtk.heal.memory.check_fits estimated the sharded run before loading (`sharded_need`)
        need, avail = sharded_need.device, available_memory(str(device))
        ckpt = sharded_need.checkpointing
    if ckpt:
        enable_checkpointing(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    tr = make_trainable(student, cfg)
    params = tr.params
    if world is not None:
        offload = bool(getattr(cfg, "cpu_offload", False))
        for m in (tr.forward, teacher):
            full = m.state_dict() if world.main else None  # the whole weights, before sharding
            shard(m, world, offload)
            materialize(m, world, full, offload)
            del full
        params = {n: p for n, p in tr.forward.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup, cfg.min_lr))
    hist, step, ppl_before = History(), 0, None

    ck = saved_checkpoint(state_dir)
    if ck is not None:
        meta = load_meta(ck)
        if meta.get("fingerprint") != fingerprint:
            raise RtkError(f"{state_dir}: holds an unfinished healing with other settings; remove it to start over")
        load_checkpoint(ck, tr.forward, opt, params)
        sched.load_state_dict(meta["scheduler"])
        set_rng_state(meta["rng"])
        data.restore(meta.get("stream"))
        step, hist = meta["step"], History.from_json(meta["history"])  # the checkpoint is the authority
        ppl_before = meta.get("ppl_before")
        echo(f"rtk: heal: resuming {state_dir} at step {step} of {steps}"
             + (f" (saved by {meta['processes']} process{'es' * (meta['processes'] != 1)})"
                if meta.get("processes", 1) != (world.size if world else 1) else ""))
    else:
        torch.manual_seed(cfg.seed + 1)  # LoRA dropout draws; identical for a fresh and a resumed run

    def run_eval():
        tr.forward.eval()
        ppl = sharded_ppl(tr.forward, evaluate)
        tr.forward.train()
        return ppl

    if measure_before and ppl_before is None and evaluate is not None:
        ppl_before = run_eval()

    def save():
        if state_dir is None:
            return
        meta = {"fingerprint": fingerprint, "step": step, "history": hist.to_json(), "scheduler": sched.state_dict(),
                "rng": rng_state(), "stream": data.state(), "ppl_before": ppl_before,
                "processes": world.size if world else 1}
        save_checkpoint(state_dir, world, tr.forward, opt, params, meta, fingerprint, steps)

    hooks = (LayerOutputs(teacher), LayerOutputs(tr.forward)) if cfg.hidden_weight else None
    tr.forward.train()
    started_at = step
    bar = tqdm(total=steps, initial=step, desc="healing", unit="step", disable=not (progress and main), leave=False)
    while step < steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum = kl_sum = ce_sum = hid_sum = 0.0
        for start in sh.starts(step):
            ids = data.batch(start, sh.micro).to(device)
            if hooks is not None:
                hooks[0].start(), hooks[1].start()
            with torch.no_grad():
                t_hidden = teacher(input_ids=ids, hidden_only=True)
            hidden = tr.forward(input_ids=ids, hidden_only=True)  # final normed hidden states; heads in the loss
            loss, kl, ce = distill_loss(hidden, tr.forward.lm_head.weight, t_hidden, teacher.lm_head.weight, ids,
                                        cfg.kl_weight, cfg.ce_weight, cfg.temperature)
            if world is not None:
                teacher.reshard()  # its root (embeddings, head) stays gathered after its forward until here
            if hooks is not None:
                hs = hidden_loss(hooks[1].take(), hooks[0].take())
                loss = loss + cfg.hidden_weight * hs
                hid_sum += hs.item() / sh.accum
            (loss / sh.accum).backward()
            del hidden, t_hidden
            loss_sum += loss.item() / sh.accum
            kl_sum += kl / sh.accum
            ce_sum += ce / sh.accum
        loss_sum, kl_sum, ce_sum, hid_sum = mean_over_ranks(world, [loss_sum, kl_sum, ce_sum, hid_sum])
        gnorm = math.nan
        if cfg.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        hist.train_seconds += dt
        hist.steps.append({"step": step, "tokens": step * per_step, "loss": loss_sum, "kl": num_or_none(kl_sum),
                           "ce": num_or_none(ce_sum), **({"hidden": hid_sum} if hooks else {}), "lr": lr, "grad_norm": num_or_none(gnorm),
                           "seconds": round(dt, 4)})
        bar.update()
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{per_step / dt:.0f}")
        if cfg.eval_every and evaluate is not None and (step % cfg.eval_every == 0 or step == steps):
            hist.evals.append({"step": step, "tokens": step * per_step, "ppl": run_eval()})
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
    for p in params.values():
        p.requires_grad_(False)
    if world is not None:
        healed = tr.forward  # sharded, adapters unmerged: gather() makes it one model
    else:
        healed = tr.finish()
        if ckpt:
            disable_checkpointing(healed)
        for p in healed.parameters():
            p.requires_grad_(False)
        healed.eval()
    last = hist.steps[-max(1, len(hist.steps) // 10):]
    record = {
        "steps": steps, "tokens_per_step": per_step, "tokens": steps * per_step, "blocks": n_blocks,
        "passes": steps * per_step / (n_blocks * seq_len) if n_blocks else None,
        "trainable_params": tr.n_trainable, "gradient_checkpointing": ckpt,
        "memory_estimate_bytes": need, "memory_available_bytes": avail,
        "train_seconds": round(hist.train_seconds, 1),
        "tokens_per_second": steps * per_step / hist.train_seconds if hist.train_seconds else math.nan,
        "loss_first": hist.steps[0]["loss"], "loss_last": sum(s["loss"] for s in last) / len(last),
        "history": hist.to_json(),
    }
    if world is not None:
        record.update(processes=world.size, micro_batch_per_process=sh.micro, grad_accum_per_process=sh.accum,
                      cpu_offload=bool(getattr(cfg, "cpu_offload", False)))
    if measure_before:
        record["ppl_before"] = ppl_before
    if measure_after and evaluate is not None:
        record["ppl_after"] = run_eval()
    return healed, record


def gather(healed, cfg: HealConfig, world: World, plain: Callable[[], torch.nn.Module]):
    """The sharded healed student made whole on rank 0 (None on the others): its weights gathered into `plain()`, a
    fresh unsharded copy of the student loaded on rank 0 (LoRA adapters put on it again, then merged)."""
    sd = full_state_dict(healed)  # every rank takes part
    if not world.main:
        return None
    student = plain()
    tr = make_trainable(student, cfg)
    missing, unexpected = tr.forward.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not student.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"gathered weights do not fit the student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model = tr.finish()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
