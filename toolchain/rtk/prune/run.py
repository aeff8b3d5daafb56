"""`rtk prune`: recipe -> scores -> search -> physical rewrite -> OUT/{plan.json, model/, report.md}.

Work in progress lives in `OUT.partial/` (search state saved after every step) and is renamed to
OUT only when complete, so OUT is never half-written and a rerun of the same recipe resumes.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rtk import __version__
from rtk.data import token_blocks
from rtk.errors import RtkError
from rtk.outdir import check_out, write_json_atomic
from rtk.plan import PLAN_FILE, read_plan, write_plan
from rtk.records.names import model_name
from rtk.prune.config import Recipe
from rtk.model.rewrite import apply_plan
from rtk.model.speed import speed_model
from rtk.model.sublayer import Sublayer, expand, model_order, owner_modules
from rtk.model.params import counted_params, param_count, total_params
from rtk.prune.scoring import candidates, existing_names, load_for_scoring, scorer_for
from rtk.prune.search import StopRule, check_reachable, kl_state_in_calibration_ppl, run_search

STATE = "search_state.json"


class SearchPaused(Exception):
    """--max-steps reached: the state is saved and a rerun continues."""


def _check_out(out: Path, recipe: Recipe) -> tuple[Path, bool]:
    """Returns (partial dir, already complete). Refuses a folder made by another recipe."""
    return check_out(out, recipe.fingerprint(), PLAN_FILE, STATE, "run", "a different recipe",
                     result_key="recipe_fingerprint")


def _heal_fingerprint(recipe: Recipe):
    """None without healing; else what must match for a finished OUT or a healing checkpoint to be reused."""
    if recipe.heal is None:
        return None
    return f"{recipe.fingerprint()}-{recipe.heal.fingerprint()}"


def _measure_line(info: dict, recipe: Recipe, name: str) -> str:
    return (f"{name}, {info['file']} [{info['split']}], {info['samples']} blocks x {info['seq_len']} "
            f"tokens ({info['predicted_tokens']:,} predicted), {recipe.dtype}, torch {torch.__version__} "
            f"on {recipe.device}")


def _check_lengths(model, recipe: Recipe) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    specs = [("data.calibration", recipe.data.calibration), ("data.evaluation", recipe.data.evaluation)]
    if recipe.select is not None:
        specs.append(("select.judge", recipe.select.judge))
    for field, spec in specs:
        if limit and spec.seq_len > limit:
            raise RtkError(f"{field}.seq_len: {spec.seq_len} is longer than the model's "
                           f"max_position_embeddings ({limit})")


def _check_one_process(recipe: Recipe) -> None:
    """rtk prune is one process (its scoring spreads over Ray workers, not torchrun): under torchrun with several
    processes, one line that says how to heal on them instead."""
    from rtk.heal.distributed import torchrun_env

    e = torchrun_env()
    if e is not None and e["WORLD_SIZE"] > 1:
        raise RtkError("rtk prune runs as one process (scoring.workers spreads it over Ray); run it without torchrun"
                       + (" and --no-heal, then heal on N processes: torchrun --nproc-per-node N -m rtk heal OUT "
                          "-o HEALED --config RECIPE (or rtk heal OUT -o HEALED --config RECIPE --nproc N)"
                          if recipe.heal is not None else ""))


def run_prune(recipe: Recipe, out: Path, progress: bool = True, echo: Callable[[str], None] = print,
              max_steps: int | None = None) -> dict:
    from rtk.model.device import resolve_runtime

    _check_one_process(recipe)
    recipe = resolve_runtime(recipe)  # device and dtype checked and made concrete before any work
    out = Path(out)
    partial, complete = _check_out(out, recipe)
    if complete:
        done = read_plan(out / PLAN_FILE)
        if done.get("heal_fingerprint") != _heal_fingerprint(recipe):
            raise RtkError(f"-o {out}: holds this recipe's plan " + ("healed differently" if done.get("heal")
                           else "without healing") + f"; choose another folder (or heal it: rtk heal {out} -o NEW)")
        echo(f"rtk: {out} already holds this recipe's result")
        return done
    if recipe.heal is not None and recipe.scoring.offload == "disk":
        raise RtkError("heal: trains the whole model in memory; scoring.offload: disk never holds it (prune "
                       "without heal:, then rtk heal OUT -o NEW where the model fits)")
    torch.manual_seed(0)
    t_start = time.perf_counter()
    sc = recipe.scoring
    pool = None
    # with Ray workers the actors score on their devices; the driver's copy (for candidates and the export)
    # stays on the CPU, or on disk with offload: disk
    loaded = load_for_scoring(recipe, device="cpu" if sc.workers > 1 else None)
    try:
        model, tokenizer, path = loaded.model, loaded.tokenizer, loaded.path
        names = existing_names(model)
        bad = [p for p in recipe.search.protect if p not in names]
        if bad:
            raise RtkError(f"search.protect: {', '.join(bad)} does not exist in this model "
                           f"({len(model.model.layers)} layers: attn.0..attn.{len(model.model.layers) - 1}, "
                           f"mlp.0..mlp.{len(model.model.layers) - 1})")
        _check_lengths(model, recipe)
        calib, calib_info = token_blocks(tokenizer, recipe.data.calibration, "data.calibration")
        evalb, eval_info = token_blocks(tokenizer, recipe.data.evaluation, "data.evaluation")
        heal_pool = None
        if recipe.heal is not None:  # read (and checked) before the search
            from rtk.heal.run import heal_blocks

            heal_pool = heal_blocks(tokenizer, recipe.heal.data, recipe.heal.tokens, seed=recipe.heal.seed)
        speed = speed_model(model.config, recipe.cost)
        cost_fn = speed.cost_fn() if recipe.search.normalize == "cost" else None
        cands = candidates(model, recipe.search.candidates, recipe.search.protect, cost_fn)
        n_total = total_params(model)
        target = recipe.search.target
        n_counted = counted_params(model, target.count)
        stop = StopRule(params_total=n_counted, speed=speed.speedup, count=target.count, **target.rules())
        check_reachable(cands, stop, speed.describe()["model"])
        if sc.workers > 1:
            from rtk.prune.scoring.workers import WorkerPool

            pool = WorkerPool(recipe, sc.workers, sc.ray_address, echo)
        scorer = scorer_for(recipe, loaded, calib, progress, pool, "calibration")  # checks the memory budget

        partial.mkdir(parents=True, exist_ok=True)
        state_path = partial / STATE
        saved = json.loads(state_path.read_text()) if state_path.is_file() else None
        if recipe.select is not None:  # its state lives in select/; this file marks the folder as this recipe's
            write_json_atomic(state_path, {"fingerprint": recipe.fingerprint(), "state": None, "select": "select/"})
            saved = None
        if saved:
            echo(f"rtk: resuming {partial} at step {len(saved['state']['steps'])} "
                 f"({len(saved['state']['removed'])} removed)")
        (partial / "recipe.yaml").write_text(recipe.to_yaml())
        steps_at_start = len(saved["state"]["removed"]) if saved else 0

        def save(state):
            write_json_atomic(state_path, {"fingerprint": recipe.fingerprint(), "state": state}, indent=2)
            if max_steps is not None and not state["done"] and len(state["removed"]) - steps_at_start >= max_steps:
                raise SearchPaused(f"rtk: paused after {max_steps} step(s) with {len(state['removed'])} removed; "
                                   f"state in {partial}; rerun the same command to continue")

        selection = None
        if recipe.select is not None:
            state, selection = _select(recipe, loaded, calib, scorer, speed, stop, cost_fn, partial, pool, progress,
                                       echo)
        else:
            searcher = _kl_scorer(recipe, loaded, calib, progress, pool) if recipe.search.criterion == "kl" else scorer
            state = run_search(searcher, cands, stop, recipe.search.method, recipe.search.normalize,
                               state=saved["state"] if saved else None, save=save, log=lambda s: echo(f"rtk: {s}"),
                               rescoring=recipe.search.rescoring)
            if recipe.search.criterion == "kl":
                state = kl_state_in_calibration_ppl(state, scorer)
        removed_names = [e["name"] for e in state["removed"]]
        removed_set = frozenset(expand(removed_names))

        # the pruned model's PPL is the original's with the removed sublayers skipped (skip == absent: tested;
        # the export below verifies the written folder against exactly that)
        eval_scorer = scorer_for(recipe, loaded, evalb, False, pool, "evaluation", ppl_only=True)
        eval_base = eval_scorer.ppl(frozenset())
        eval_final = eval_scorer.ppl(removed_set)
        name = model_name(recipe.model)
        n_after = n_total - sum(param_count(_owner(model, n)) for n in removed_set)
        plan = {
            "rtk_version": __version__,
            "model": recipe.model,
            "model_path": path,
            "recipe": recipe.model_dump(mode="json"),
            "recipe_fingerprint": recipe.fingerprint(),
            "params_total": n_total,
            "params_after": n_after,
            "params_removed": n_total - n_after,
            "params_removed_fraction": (n_total - n_after) / n_total,
            "params_counted": {"count": target.count, "total": n_counted,
                               "removed_fraction": (n_total - n_after) / n_counted},
            "ppl_base": state["ppl_base"],
            "ppl_final": state["ppl_current"],
            "calibration": {**calib_info, "measured": _measure_line(calib_info, recipe, name)},
            "eval": {**eval_info, "ppl_base": eval_base, "ppl_final": eval_final,
                     "measured": _measure_line(eval_info, recipe, name)},
            "removed": [{k: e[k] for k in ("name", "layer", "kind", "params", "ri", "nri", "ppl_after", "kl_exp_after")
                         if k in e} for e in state["removed"]],
            "removed_sublayers": model_order(removed_set),
            "steps": state["steps"],
            "scoring": _scoring_record(recipe, scorer, loaded),
            "speed": {**speed.describe(), "target": recipe.search.target.speedup,
                      "predicted_speedup": speed.speedup(removed_set)},
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        }
        if selection is not None:
            plan["selection"] = selection
        model_dir = partial / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        recipe_yaml = (partial / "recipe.yaml").read_text()
        if loaded.in_memory:
            from rtk.export.safetensors import export_model

            model = model.to("cpu") if loaded.offload == "cpu" else model
            pruned = apply_plan(model, removed_names)
            final, original = pruned, model
            if recipe.heal is not None:
                from rtk.heal.run import heal_model, student_copy

                final, plan["heal"] = heal_model(student_copy(pruned), model, tokenizer, recipe.heal, evalb,
                                                 eval_info, partial / "heal", _heal_fingerprint(recipe),
                                                 ppl_before=eval_final, progress=progress, echo=echo, pool=heal_pool)
                plan["heal"]["teacher"] = {"model": recipe.model, "path": path, "ppl": eval_base}
                plan["heal_fingerprint"] = _heal_fingerprint(recipe)
                plan["wall_seconds"] = round(time.perf_counter() - t_start, 1)
                original = None  # the healed weights differ from the original's: verified against the healed model
            exported = export_model(final, tokenizer, model_dir, original=original, plan=plan,
                                    recipe_yaml=recipe_yaml, source=path)
        else:
            from rtk.export.streamed import export_streamed

            exported = export_streamed(path, model.config, removed_names, tokenizer, model_dir,
                                       dtype=recipe.dtype, device=str(loaded.source.device), plan=plan,
                                       recipe_yaml=recipe_yaml)
        if exported["vllm_plugin"]:
            echo(f"rtk: note: the model is {exported['vllm']}")
        write_plan(partial / PLAN_FILE, plan)
        from rtk.records.prune import write_report

        write_report(plan, partial)
        shutil.rmtree(partial / "heal", ignore_errors=True)  # checkpoints: the healed model is written
    finally:
        if pool is not None:
            pool.close()
        loaded.close()
    partial.rename(out)
    return plan


def _kl_scorer(recipe: Recipe, loaded, calib, progress: bool, pool):
    """The KL criterion's scorer over the calibration blocks: exp(mean KL) from the original model's log-probs."""
    from rtk.model.ppl import teacher_logprobs

    return scorer_for(recipe, loaded, calib, progress, pool, "calibration-kl",
                      teacher_logprobs=teacher_logprobs(loaded.model, calib, recipe.scoring.batch_size))


def _select(recipe: Recipe, loaded, calib, scorer, speed, stop, cost_fn, partial: Path, pool, progress: bool,
            echo) -> tuple[dict, dict]:
    """recipe select:: the winner's search state (calibration PPLs in ppl_base / ppl_current) and the record."""
    from rtk.prune.select import judge_blocks, select_plan

    model, sel = loaded.model, recipe.select
    scorers = {"ppl": scorer}
    if "kl" in sel.criteria:
        scorers["kl"] = _kl_scorer(recipe, loaded, calib, progress, pool)
    jb, jinfo, jspans = judge_blocks(loaded.tokenizer, recipe)
    jscorer = scorer_for(recipe, loaded, jb, False, pool, "judge", ppl_only=True)
    fams = {f: candidates(model, f, recipe.search.protect, cost_fn) for f in ("sublayers", "blocks")}
    state, record = select_plan(recipe, model, loaded.tokenizer, calib, scorers, fams, stop, speed,
                                (jb, jinfo, jspans, jscorer), partial, progress, echo,
                                f"{recipe.fingerprint()}-{sel.heal.fingerprint()}")
    gone = frozenset(expand(e["name"] for e in state["removed"]))
    return {**state, "ppl_base": scorer.ppl(frozenset()), "ppl_current": scorer.ppl(gone)}, record


def _owner(model, name: str):
    """The modules a sublayer name removes (its branch and its norm)."""
    s = Sublayer.parse(name)
    return torch.nn.ModuleList(owner_modules(model.model.layers[s.layer], s.kind))


def _scoring_record(recipe: Recipe, scorer, loaded) -> dict:
    sc = recipe.scoring
    rec = {"engine": sc.engine, "batch_size": sc.batch_size, "offload": sc.offload, "workers": sc.workers,
           "device": recipe.device, "dtype": recipe.dtype,
           "candidate_evaluations": scorer.evaluations, "seconds": round(scorer.seconds, 1),
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    if sc.engine == "per-candidate":
        rec["reuse_activations"] = sc.reuse_activations
    else:
        rec.update({"memory": sc.memory, "streams": sc.streams})
    if hasattr(scorer, "layer_passes"):
        rec["stream_layer_passes"] = scorer.layer_passes
    if getattr(loaded.source, "weight_reads", 0):
        rec["layer_weight_reads"] = loaded.source.weight_reads
    return rec
