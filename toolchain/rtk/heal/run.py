"""Healing as a step of `rtk prune` (`heal:` in the recipe) and as `rtk heal PRUNED_DIR -o OUT`.

Both measure the student's evaluation PPL before and after, and `rtk heal` writes OUT/{plan.json, model/,
report.md, loss_curve.png} through the same export and verification as `rtk prune` (the healed weights
reloaded from disk must give the in-memory healed model's logits). Work in progress, checkpoints
included, lives in OUT.partial/ and a rerun of the same command continues it.
"""
from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from rtk import __version__
from rtk.data import read_text, token_blocks
from rtk.errors import RtkError
from rtk.outdir import check_out, fingerprint
from rtk.model.sublayer import removed_set
from rtk.plan import PLAN_FILE, read_plan, write_plan
from rtk.data import DataConfig, DataSpec
from rtk.heal.config import HealConfig, HealData, check_heal_text
from rtk.model.params import total_params
from rtk.model.ppl import model_ppl, model_ppl_and_block_nll
from rtk.heal.distributed import World
from rtk.heal.trainer import HealPaused, STATE, distill, gather, sharded_ppl

HEAL_DIR = "heal"  # checkpoints inside OUT.partial/
STREAM_KEYS = {"stream", "shuffle_blocks", "repeat"}  # HealData's own keys, not DataSpec's
__all__ = ["HealPaused", "heal_blocks", "heal_model", "run_heal", "check_heal_text", "check_same_tokenizer"]


def heal_blocks(tokenizer, spec: HealData, tokens: int, field: str = "heal.data",
                avoid=(), seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The pool of training blocks: `spec.samples` of them, or (samples: null) as many as the budget needs,
    or every block the text holds when it holds fewer (the loop then reads them again, reshuffled). `avoid`:
    token ranges of the same text held out (rtk.data.token_blocks). A streamed text (`stream: true`) gives a
    rtk.heal.blocks.BlockStream that reads it as the loop goes."""
    if spec.stream:
        from rtk.heal.blocks import BlockStream, stream_files

        if avoid:
            raise RtkError(f"{field}: a stream cannot hold blocks out for a judge; give select's judge another text")
        if spec.kind != "hub":
            stream_files(spec, field)  # one line now for a missing file or an empty folder
        info = {"source": spec.source, "file": spec.source, "text": spec.describe().rsplit(",", 1)[0] + " (streamed)",
                "split": spec.split, "seq_len": spec.seq_len, "stream": True, "shuffle_blocks": spec.shuffle_blocks,
                "repeat": spec.repeat}
        if spec.field is not None:
            info["field"] = spec.field
        return BlockStream(tokenizer, spec, seed, field, need=math.ceil(tokens / spec.seq_len)), info
    n = spec.samples
    if n is None:
        n = math.ceil(tokens / spec.seq_len)
        if spec.kind != "hub":
            text, _ = read_text(spec, field)
            have = len(tokenizer(text, add_special_tokens=False)["input_ids"]) // spec.seq_len
            have -= sum(-(-(b - a) // spec.seq_len) + 1 for a, b in avoid)  # blocks an avoided range can overlap
            if have < 1:
                raise RtkError(f"{field}: {spec.source} holds fewer than {spec.seq_len} tokens"
                               + (" outside the held-out blocks" if avoid else "") + "; lower seq_len")
            n = min(n, have)
    spec_n = DataSpec(**{**spec.model_dump(exclude=STREAM_KEYS), "samples": n})
    blocks, info = token_blocks(tokenizer, spec_n, field, avoid)
    return blocks, info


def check_same_tokenizer(student_tok, teacher_tok, teacher_vocab: int, student_vocab: int, teacher: str) -> None:
    """Distillation compares distributions over the same token ids: one line when they are not the same."""
    if teacher_vocab != student_vocab:
        raise RtkError(f"--teacher {teacher}: vocabulary of {teacher_vocab:,} tokens, the student's "
                       f"{student_vocab:,}; distillation needs the same tokenizer")
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        raise RtkError(f"--teacher {teacher}: its tokenizer differs from the student's ({len(diff):,} token/id "
                       f"pairs differ, e.g. {diff[0][0]!r} -> {diff[0][1]}); distillation needs the same tokenizer")


def heal_model(student, teacher, tokenizer, cfg: HealConfig, evalb: torch.Tensor, eval_info: dict,
               state_dir: Optional[Path], fingerprint: str, *, ppl_before: Optional[float] = None,
               progress: bool = True, echo: Callable[[str], None] = print,
               max_steps: Optional[int] = None, pool: Optional[tuple] = None, world: Optional[World] = None,
               plain: Optional[Callable] = None, sharded_need=None,
               teacher_ppl: bool = False) -> tuple[Optional[torch.nn.Module], Optional[dict]]:
    """Distil `student` (changed in place) from `teacher`; returns (healed model, the record plan.json keeps).
    `pool`: heal_blocks' result when already read. Under several processes (`world`) the PPLs are measured on the
    sharded models, and the healed model is gathered whole into `plain()` on rank 0; the other ranks get
    (None, None). `teacher_ppl`: the record's `teacher_ppl` is measured too."""
    t0 = time.perf_counter()
    blocks, info = pool or heal_blocks(tokenizer, cfg.data, cfg.tokens, seed=cfg.seed)
    evaluate = lambda m: model_ppl(m, evalb)  # noqa: E731
    if ppl_before is None and world is None:
        ppl_before = model_ppl(student, evalb)
    dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    device = world.device if world else str(next(student.parameters()).device)
    size = (f"{blocks.shape[0]} blocks x {blocks.shape[1]}" if isinstance(blocks, torch.Tensor)
            else f"streamed in blocks of {cfg.data.seq_len}")
    echo(f"rtk: heal: {cfg.method}, {cfg.tokens:,} tokens of {info['text']} ({size}), {dtype} on {device}"
         + (f" x {world.size} processes (FSDP2)" if world else "")
         + (f"; evaluation PPL before {ppl_before:.3f}" if ppl_before is not None else ""))
    healed, rec = distill(student, teacher, blocks, cfg, state_dir, fingerprint, progress=progress, echo=echo,
                          evaluate=evaluate, max_steps=max_steps, world=world,
                          measure_before=world is not None and ppl_before is None, measure_after=world is not None,
                          sharded_need=sharded_need)
    t_ppl = None
    if teacher_ppl:
        t_ppl = sharded_ppl(teacher, evaluate)
    if world is not None:
        ppl_before = rec.pop("ppl_before", None) if ppl_before is None else ppl_before
        ppl_after = rec.pop("ppl_after")
        healed = gather(healed, cfg, world, plain)
        if healed is None:
            return None, None
        block_nll = None
    else:
        ppl_after, block_nll = model_ppl_and_block_nll(healed, evalb)  # one pass: the PPL and what pairs it
    hist = rec.pop("history")
    record = {
        "fingerprint": fingerprint, "config": cfg.model_dump(mode="json"),
        "method": cfg.method, "data": info, "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
        **rec,
        "eval": {"split": eval_info.get("split"), "text": eval_info.get("text"), "samples": eval_info["samples"],
                 "seq_len": eval_info["seq_len"], "ppl_before": ppl_before, "ppl_after": ppl_after,
                 **({"block_nll": block_nll} if block_nll is not None else {}),
                 "measured": f"{eval_info.get('text')}, {eval_info['samples']} blocks x {eval_info['seq_len']} "
                             f"tokens, {dtype}, torch {torch.__version__} on {device}"
                             + (f", {world.size} processes (FSDP2)" if world else "")},
        "history": hist,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if t_ppl is not None:
        record["teacher_ppl"] = t_ppl
    echo(f"rtk: heal: {rec['tokens']:,} tokens in {rec['train_seconds']:.0f} s ({rec['tokens_per_second']:.0f} "
         f"tokens/s), loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f}; evaluation PPL "
         f"{ppl_before:.3f} -> {ppl_after:.3f}")
    return healed, record


def student_copy(pruned):
    """A student that owns its weights (apply_plan shares tensors with the original, the teacher)."""
    return copy.deepcopy(pruned)


def locate(pruned_dir: Path) -> tuple[Path, Optional[dict]]:
    """(student model folder, plan.json or None) of an `rtk prune` OUT folder or a model folder."""
    d = Path(pruned_dir)
    if not d.is_dir():
        raise RtkError(f"PRUNED_DIR: {d}: no such folder")
    if (d / "model" / "config.json").is_file():
        model_dir = d / "model"
    elif (d / "config.json").is_file():
        model_dir = d
    else:
        raise RtkError(f"PRUNED_DIR: {d}: neither a model folder (config.json) nor an rtk prune output (model/)")
    for f in (d / PLAN_FILE, model_dir / PLAN_FILE):
        if f.is_file():
            return model_dir, read_plan(f, f"PRUNED_DIR: {f}")
    return model_dir, None


def teacher_spec(plan: Optional[dict], teacher: Optional[str], pruned_dir: Path) -> str:
    if teacher:
        return teacher
    if not plan or not (plan.get("model_path") or plan.get("model")):
        raise RtkError(f"PRUNED_DIR: {pruned_dir} has no plan.json naming the original model; give --teacher MODEL")
    mp = plan.get("model_path")
    if mp and Path(mp, "config.json").is_file():
        return str(mp)
    return plan["model"]


def _plan_ppls(plan: Optional[dict], evaluation: DataSpec, dtype: str, teacher: Optional[str]) -> tuple:
    """(teacher PPL, student PPL) that `rtk prune` measured on these evaluation blocks in this dtype, or
    Nones: a healed folder's own PPL is not in its plan's `eval`, another teacher's never is."""
    ev = (plan or {}).get("eval") or {}
    rec = (plan or {}).get("recipe") or {}
    if plan is None or plan.get("heal") or "ppl_final" not in ev or rec.get("dtype") != dtype:
        return None, None
    if DataSpec(**rec.get("data", {}).get("evaluation", {})) != evaluation:
        return None, None
    return (ev.get("ppl_base") if teacher is None else None), ev["ppl_final"]


def folder_id(folder: Path) -> str:
    """Identifies a model folder's weights without reading them: config.json and the weight files' sizes."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


@dataclass
class Job:
    """What `rtk heal` checked before loading anything: one process's part of a healing."""

    model_dir: Path
    plan: Optional[dict]
    t_spec: str  # the teacher as given (or plan.json's)
    t_path: str  # its local folder or hub id
    teacher: Optional[str]  # --teacher
    out: Path
    partial: Path
    complete: bool  # OUT already holds this healing
    cfg: HealConfig
    evaluation: DataSpec
    device: str
    dtype: str
    fingerprint: str
    world: Optional[World]
    need: object = None  # rtk.heal.memory.Need


def prepare_heal(pruned_dir: Path, out: Path, cfg: HealConfig, teacher: Optional[str], device: str, dtype: str,
                 evaluation: Optional[DataSpec], world: Optional[World]) -> Job:
    """Every check of a healing that needs no weights, each a one-line RtkError: the folders, the teacher, the
    texts, the device, OUT, the tokenizers, the memory per process (`world`: the processes that will heal)."""
    from rtk.heal.distributed import share
    from rtk.model.device import resolve_device, resolve_dtype
    from rtk.model.load import load_hf_config, load_tokenizer, resolve

    if world is not None:
        share(cfg.micro_batch, cfg.grad_accum, world)  # one line when N does not divide the global batch
    model_dir, plan = locate(pruned_dir)
    t_spec = teacher_spec(plan, teacher, Path(pruned_dir))
    if evaluation is None:
        evaluation = DataConfig().evaluation
        if plan and isinstance(plan.get("recipe"), dict) and "evaluation" in plan["recipe"].get("data", {}):
            evaluation = DataSpec(**plan["recipe"]["data"]["evaluation"])
    check_heal_text(cfg, evaluation)
    dev = world.device if world else resolve_device(device, "--device")
    if world is None and cfg.cpu_offload:
        raise RtkError("heal.cpu_offload: applies to healing on several processes (torchrun, --nproc)")
    if world is not None and cfg.cpu_offload and not dev.startswith("cuda"):
        raise RtkError("heal.cpu_offload: keeps the shards of a GPU run in CPU memory; on the CPU they are there already")
    dt = resolve_dtype(dtype, dev, "--dtype")
    t_path = resolve(t_spec)
    fp = fingerprint({"heal": cfg.fingerprint(), "student": folder_id(model_dir), "teacher": str(t_spec), "dtype": dt})
    partial, complete = check_out(out, fp, PLAN_FILE, f"{HEAL_DIR}/{STATE}", "healing",
                                  "another model or other heal settings", result_key="heal_fingerprint")
    job = Job(model_dir, plan, t_spec, t_path, teacher, out, partial, complete, cfg, evaluation, dev, dt, fp, world)
    if complete:
        return job
    t_conf, s_conf = load_hf_config(t_path), load_hf_config(str(model_dir))
    check_same_tokenizer(load_tokenizer(str(model_dir)), load_tokenizer(t_path), t_conf.vocab_size,
                         s_conf.vocab_size, t_spec)
    job.need = _check_memory(s_conf, t_conf, cfg, dt, dev, world)
    return job


def run_heal(pruned_dir: Path, out: Path, cfg: Optional[HealConfig] = None, teacher: Optional[str] = None,
             device: str = "auto", dtype: str = "auto", progress: bool = True,
             echo: Callable[[str], None] = print, max_steps: Optional[int] = None,
             evaluation: Optional[DataSpec] = None) -> Optional[dict]:
    """`rtk heal`: heal PRUNED_DIR's model from its original (plan.json) or `teacher` into OUT. The PPL before
    and after is measured on `evaluation`, by default the evaluation text of the recipe that pruned it. Under
    torchrun with several processes every rank runs it; rank 0 writes OUT and returns plan.json, the others None."""
    from rtk.heal.distributed import current_world, join, leave

    world = current_world(device)  # several processes under torchrun, else None
    if world is not None and not world.main:
        echo = lambda s: None  # noqa: E731  (rank 0 speaks for all)
    job = prepare_heal(Path(pruned_dir), Path(out), cfg or HealConfig(), teacher, device, dtype, evaluation, world)
    if job.complete:
        echo(f"rtk: {out} already holds this healing")
        return read_plan(job.out / PLAN_FILE)
    if world is not None:
        join(world)
    try:
        return _heal(job, progress, echo, max_steps)
    finally:
        if world is not None:
            leave()


def _check_memory(s_conf, t_conf, cfg: HealConfig, dt: str, dev: str, world: Optional[World]):
    """rtk.heal.memory's estimate per process, before anything is loaded; one line when it cannot fit."""
    from rtk.heal.distributed import share
    from rtk.heal.memory import check_fits
    from rtk.model.arch import rtk_config_from_hf
    from rtk.model.device import DTYPES

    sh = share(cfg.micro_batch, cfg.grad_accum, world)
    esize = torch.empty((), dtype=DTYPES[dt]).element_size()
    return check_fits(rtk_config_from_hf(s_conf), rtk_config_from_hf(t_conf), cfg, esize, dev,
                      world.size if world else 1, world.local_size if world else 1, sh.micro)


def _heal(job: Job, progress: bool, echo: Callable[[str], None], max_steps: Optional[int]) -> Optional[dict]:
    """Load, heal, write OUT (rank 0). Under several processes rank 0 loads both models on the CPU, the others build
    them on the meta device, and the weights reach every rank's shards from rank 0 (rtk.heal.distributed)."""
    from rtk.heal.distributed import barrier
    from rtk.model.load import load_model, load_skeleton, load_tokenizer

    model_dir, plan, t_spec, t_path, teacher, world = (job.model_dir, job.plan, job.t_spec, job.t_path, job.teacher,
                                                        job.world)
    dev, dt, partial, cfg = job.device, job.dtype, job.partial, job.cfg
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if world is None or world.main:
        load_dev = "cpu" if world else dev
        student, tokenizer, s_path = load_model(str(model_dir), dt, load_dev)
        teacher_m, _, _ = load_model(t_path, dt, load_dev)
    else:
        student, teacher_m = load_skeleton(str(model_dir), dt), load_skeleton(t_path, dt)
        tokenizer, s_path = load_tokenizer(str(model_dir)), str(model_dir)
    evalb, eval_info = token_blocks(tokenizer, job.evaluation, "evaluation")
    if world is None or world.main:
        partial.mkdir(parents=True, exist_ok=True)
    barrier(world)
    known = _plan_ppls(plan, job.evaluation, dt, teacher)
    healed, record = heal_model(student, teacher_m, tokenizer, cfg, evalb, eval_info, partial / HEAL_DIR,
                                job.fingerprint, progress=progress, echo=echo, max_steps=max_steps,
                                ppl_before=known[1], world=world,
                                plain=lambda: load_model(str(model_dir), dt, "cpu")[0], sharded_need=job.need,
                                teacher_ppl=known[0] is None)
    if healed is None:  # a rank other than 0: rank 0 writes OUT
        return None
    t_ppl = record.pop("teacher_ppl", None)
    record["teacher"] = {"model": teacher or (plan or {}).get("model") or t_spec, "path": t_path,
                         "ppl": known[0] if known[0] is not None else t_ppl}
    del teacher_m
    new_plan = dict(plan or {})
    new_plan.setdefault("model", t_spec)
    new_plan.setdefault("model_path", t_path)
    new_plan.setdefault("params_total", None)
    new_plan.setdefault("removed_sublayers", removed_set(healed.config).names)  # healed without a plan.json
    new_plan.update({"rtk_version": __version__, "healed_from": str(model_dir), "heal": record,
                     "heal_fingerprint": job.fingerprint, "params_after": total_params(healed),
                     "heal_wall_seconds": round(time.perf_counter() - t_start, 1)})
    if new_plan["params_total"] is None:
        new_plan.pop("params_total")
    write_out(healed, tokenizer, new_plan, partial, source=s_path, echo=echo, recipe_dir=model_dir)
    partial.rename(job.out)
    return new_plan


def write_out(healed, tokenizer, plan: dict, partial: Path, source: str, echo: Callable[[str], None],
              recipe_dir: Optional[Path] = None) -> None:
    """PARTIAL/{model/, plan.json, report.md, loss_curve.png} of a healing (the checkpoints are removed)."""
    from rtk.export.safetensors import export_model
    from rtk.records.heal import write_heal_report

    model_dir = partial / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    recipe_yaml = None
    for f in ((partial / "recipe.yaml"), (recipe_dir / "recipe.yaml") if recipe_dir else None):
        if f is not None and f.is_file():
            recipe_yaml = f.read_text()
            break
    exported = export_model(healed, tokenizer, model_dir, plan=plan, recipe_yaml=recipe_yaml, source=source)
    if exported["vllm_plugin"]:
        echo(f"rtk: note: the model is {exported['vllm']}")
    plan["heal"]["export"] = {k: exported[k] for k in ("architecture", "dtype", "params", "weight_bytes",
                                                       "verification")}
    write_plan(partial / PLAN_FILE, plan)
    write_heal_report(plan, partial)
    shutil.rmtree(partial / HEAL_DIR, ignore_errors=True)
