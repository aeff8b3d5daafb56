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
    run = _Distillation(student, teacher, blocks, cfg, world, sharded_need)
    run.start(state_dir, fingerprint, echo, evaluate)
    if measure_before and run.ppl_before is None and evaluate is not None:
        run.ppl_before = run.evaluate()
    run.train(progress, max_steps)
    healed = run.finish()
    record = run.record()
    if measure_before:
        record["ppl_before"] = run.ppl_before
    if measure_after and evaluate is not None:
        record["ppl_after"] = run.evaluate()
    return healed, record


class _Distillation:
    """One distillation run, step by step: set up (memory, trainable weights, shards, optimizer), resume from
    the state folder, train, finish the healed student, and record what happened."""

    def __init__(self, student, teacher, blocks, cfg: HealConfig, world: Optional[World], sharded_need):
        self.device = torch.device(world.device) if world else next(student.parameters()).device
        if next(student.parameters()).dtype == torch.float16:
            raise RtkError("dtype: float16 cannot train without loss scaling; heal in bfloat16 (CUDA) or float32")
        self.cfg, self.teacher, self.world = cfg, teacher, world
        self.data = blocks if hasattr(blocks, "batch") else Pool(blocks, cfg.seed)
        self.steps, self.per_step = plan_steps(cfg, self.data.seq_len)
        self.sh = share(cfg.micro_batch, cfg.grad_accum, world)
        self.main = world is None or world.main
        self._checkpointing(student, sharded_need)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.tr = make_trainable(student, cfg)
        self.params = self.tr.params
        if world is not None:
            offload = bool(getattr(cfg, "cpu_offload", False))
            for m in (self.tr.forward, teacher):
                full = m.state_dict() if world.main else None  # the whole weights, before sharding
                shard(m, world, offload)
                materialize(m, world, full, offload)
                del full
            self.params = {n: p for n, p in self.tr.forward.named_parameters() if p.requires_grad}
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.steps, cfg.warmup, cfg.min_lr))
        self.hist, self.step, self.ppl_before = History(), 0, None

    def _checkpointing(self, student, sharded_need):
        """Gradient checkpointing on when asked, or (auto) when the estimated memory does not fit."""
        cfg, avail = self.cfg, available_memory(str(self.device))
        if self.world is None:
            self.need = memory_estimate(student, self.teacher, cfg, self.data.seq_len)
            self.ckpt = cfg.gradient_checkpointing == "on" or (
                cfg.gradient_checkpointing == "auto" and self.need > 0.8 * avail)
        else:  # rtk.heal.memory.check_fits estimated the sharded run before loading (`sharded_need`)
            self.need, self.ckpt = sharded_need.device, sharded_need.checkpointing
        self.avail = avail
        if self.ckpt:
            enable_checkpointing(student)

    def start(self, state_dir: Optional[Path], fingerprint: str, echo: Callable[[str], None], evaluate):
        """Continue from the checkpoint in `state_dir` when there is one (it must have the same fingerprint)."""
        self.state_dir, self.fingerprint, self.evaluator = state_dir, fingerprint, evaluate
        ck = saved_checkpoint(state_dir)
        if ck is None:
            torch.manual_seed(self.cfg.seed + 1)  # LoRA dropout draws; identical for a fresh and a resumed run
            return
        meta = load_meta(ck)
        if meta.get("fingerprint") != fingerprint:
            raise RtkError(f"{state_dir}: holds an unfinished healing with other settings; remove it to start over")
        load_checkpoint(ck, self.tr.forward, self.opt, self.params)
        self.sched.load_state_dict(meta["scheduler"])
        set_rng_state(meta["rng"])
        self.data.restore(meta.get("stream"))
        self.step, self.hist = meta["step"], History.from_json(meta["history"])  # the checkpoint is the authority
        self.ppl_before = meta.get("ppl_before")
        processes = self.world.size if self.world else 1
        echo(f"rtk: heal: resuming {state_dir} at step {self.step} of {self.steps}"
             + (f" (saved by {meta['processes']} process{'es' * (meta['processes'] != 1)})"
                if meta.get("processes", 1) != processes else ""))

    def evaluate(self) -> float:
        self.tr.forward.eval()
        ppl = sharded_ppl(self.tr.forward, self.evaluator)
        self.tr.forward.train()
        return ppl

    def save(self):
        if self.state_dir is None:
            return
        meta = {"fingerprint": self.fingerprint, "step": self.step, "history": self.hist.to_json(),
                "scheduler": self.sched.state_dict(), "rng": rng_state(), "stream": self.data.state(),
                "ppl_before": self.ppl_before, "processes": self.world.size if self.world else 1}
        save_checkpoint(self.state_dir, self.world, self.tr.forward, self.opt, self.params, meta, self.fingerprint,
                        self.steps)

    def train(self, progress: bool, max_steps: Optional[int]):
        """Optimizer steps until the end (or `max_steps` of this call: HealPaused, checkpoint saved)."""
        cfg, steps = self.cfg, self.steps
        self.hooks = (LayerOutputs(self.teacher), LayerOutputs(self.tr.forward)) if cfg.hidden_weight else None
        self.tr.forward.train()
        started_at = self.step
        bar = tqdm(total=steps, initial=self.step, desc="healing", unit="step", disable=not (progress and self.main),
                   leave=False)
        while self.step < steps:
            loss_sum, dt = self._optimizer_step()
            bar.update()
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{self.per_step / dt:.0f}")
            step = self.step
            if cfg.eval_every and self.evaluator is not None and (step % cfg.eval_every == 0 or step == steps):
                self.hist.evals.append({"step": step, "tokens": step * self.per_step, "ppl": self.evaluate()})
            if step % cfg.checkpoint_every == 0 or step == steps:
                self.save()
            if max_steps is not None and step < steps and step - started_at >= max_steps:
                self.save()
                bar.close()
                raise HealPaused(f"rtk: heal: paused after {max_steps} step(s) at step {step} of {steps}; state in "
                                 f"{self.state_dir}; rerun the same command to continue")
        bar.close()

    def _optimizer_step(self) -> tuple[float, float]:
        """One global batch: its micro-batches forward and backward, clipping, AdamW; -> (mean loss, seconds)."""
        cfg, sh = self.cfg, self.sh
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, kl, ce, hidden
        for start in sh.starts(self.step):
            for i, v in enumerate(self._micro_batch(self.data.batch(start, sh.micro).to(self.device))):
                sums[i] += v / sh.accum
        loss_sum, kl_sum, ce_sum, hid_sum = mean_over_ranks(self.world, sums)
        gnorm = math.nan
        if cfg.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
            gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        self.hist.train_seconds += dt
        self.hist.steps.append({"step": self.step, "tokens": self.step * self.per_step, "loss": loss_sum,
                                "kl": num_or_none(kl_sum), "ce": num_or_none(ce_sum),
                                **({"hidden": hid_sum} if self.hooks else {}), "lr": lr,
                                "grad_norm": num_or_none(gnorm), "seconds": round(dt, 4)})
        return loss_sum, dt

    def _micro_batch(self, ids) -> tuple[float, float, float, float]:
        """Forward both models and backward the student's loss on one micro-batch; -> (loss, kl, ce, hidden)."""
        cfg, hooks, student = self.cfg, self.hooks, self.tr.forward
        if hooks is not None:
            hooks[0].start(), hooks[1].start()
        with torch.no_grad():
            t_hidden = self.teacher(input_ids=ids, hidden_only=True)
        hidden = student(input_ids=ids, hidden_only=True)  # final normed hidden states; heads in the loss
        loss, kl, ce = distill_loss(hidden, student.lm_head.weight, t_hidden, self.teacher.lm_head.weight, ids,
                                    cfg.kl_weight, cfg.ce_weight, cfg.temperature)
        if self.world is not None:
            self.teacher.reshard()  # its root (embeddings, head) stays gathered after its forward until here
        hs = 0.0
        if hooks is not None:
            hs_t = hidden_loss(hooks[1].take(), hooks[0].take())
            loss = loss + cfg.hidden_weight * hs_t
            hs = hs_t.item()
        (loss / self.sh.accum).backward()
        del hidden, t_hidden
        return loss.item(), kl, ce, hs

    def finish(self):
        """The trained student, frozen in eval mode (sharded, adapters unmerged, on several processes)."""
        if self.hooks is not None:
            for hk in self.hooks:
                hk.remove()
        self.tr.forward.eval()
        for p in self.params.values():
            p.requires_grad_(False)
        if self.world is not None:
            return self.tr.forward  # sharded, adapters unmerged: gather() makes it one model
        healed = self.tr.finish()
        if self.ckpt:
            disable_checkpointing(healed)
        for p in healed.parameters():
            p.requires_grad_(False)
        return healed.eval()

    def record(self) -> dict:
        hist, steps, per_step = self.hist, self.steps, self.per_step
        n_blocks, last = self.data.n_blocks, hist.steps[-max(1, len(hist.steps) // 10):]
        record = {
            "steps": steps, "tokens_per_step": per_step, "tokens": steps * per_step, "blocks": n_blocks,
            "passes": steps * per_step / (n_blocks * self.data.seq_len) if n_blocks else None,
            "trainable_params": self.tr.n_trainable, "gradient_checkpointing": self.ckpt,
            "memory_estimate_bytes": self.need, "memory_available_bytes": self.avail,
            "train_seconds": round(hist.train_seconds, 1),
            "tokens_per_second": steps * per_step / hist.train_seconds if hist.train_seconds else math.nan,
            "loss_first": hist.steps[0]["loss"], "loss_last": sum(s["loss"] for s in last) / len(last),
            "history": hist.to_json(),
        }
        if self.world is not None:
            record.update(processes=self.world.size, micro_batch_per_process=self.sh.micro,
                          grad_accum_per_process=self.sh.accum,
                          cpu_offload=bool(getattr(self.cfg, "cpu_offload", False)))
        return record


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
