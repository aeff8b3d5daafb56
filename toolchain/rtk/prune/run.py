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
from rtk.errors import RtkError
from rtk.outdir import check_out, write_json_atomic
from rtk.plan import PLAN_FILE, Plan, read_plan, write_plan
from rtk.records.names import model_name
from rtk.prune.config import Recipe
from rtk.prune.criteria import describe, removal_order
from rtk.prune.prepare import Setup, prepare
from rtk.model.rewrite import apply_plan
from rtk.model.sublayer import Sublayer, expand, model_order, owner_modules
from rtk.model.params import param_count
from rtk.prune.scoring import scorer_for

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
    """setup -> search (or select:) -> evaluate -> rewrite -> heal -> export -> records, in OUT.partial, renamed
    to OUT when complete."""
    from rtk.model.device import resolve_runtime

    _check_one_process(recipe)
    recipe = resolve_runtime(recipe)  # device and dtype checked and made concrete before any work
    if recipe.select is not None:
        from rtk.prune.select import check_judge

        check_judge(recipe.select)
    out = Path(out)
    partial, complete = _check_out(out, recipe)
    if complete:
        return _finished(out, recipe, echo)
    if recipe.heal is not None and recipe.scoring.offload == "disk":
        raise RtkError("heal: trains the whole model in memory; scoring.offload: disk never holds it (prune "
                       "without heal:, then rtk heal OUT -o NEW where the model fits)")
    torch.manual_seed(0)
    t_start = time.perf_counter()
    setup = prepare(recipe, progress, echo)
    try:
        heal_pool = _heal_pool(setup)  # read (and checked) before the search
        setup.scorer("ppl")  # checks the memory budget
        state, selection = _search_or_select(setup, partial, echo, max_steps)
        plan = _plan(setup, state, _evaluate(setup, state), selection, t_start)
        plan = _rewrite_heal_export(setup, plan, partial, heal_pool, t_start, echo)
        _records(plan, partial, recipe)
    finally:
        setup.close()
    partial.rename(out)
    return plan


def _finished(out: Path, recipe: Recipe, echo) -> dict:
    """OUT already holds this recipe's plan: returned, unless it was healed otherwise than the recipe says."""
    done = read_plan(out / PLAN_FILE)
    if done.get("heal_fingerprint") != _heal_fingerprint(recipe):
        raise RtkError(f"-o {out}: holds this recipe's plan " + ("healed differently" if done.get("heal")
                       else "without healing") + f"; choose another folder (or heal it: rtk heal {out} -o NEW)")
    echo(f"rtk: {out} already holds this recipe's result")
    return done


def _heal_pool(setup: Setup):
    """heal:'s training blocks (None without healing)."""
    h = setup.recipe.heal
    if h is None:
        return None
    from rtk.heal.run import heal_blocks

    return heal_blocks(setup.tokenizer, h.data, h.tokens, seed=h.seed)


def _search_or_select(setup: Setup, partial: Path, echo, max_steps: int | None) -> tuple[dict, dict | None]:
    """The search state in calibration PPL (saved in OUT.partial after every step, resumed from it) and, with
    select:, the selection record."""
    recipe = setup.recipe
    partial.mkdir(parents=True, exist_ok=True)
    state_path = partial / STATE
    saved = json.loads(state_path.read_text()) if state_path.is_file() else None
    (partial / "recipe.yaml").write_text(recipe.to_yaml())
    if recipe.select is not None:  # its state lives in select/; this file marks the folder as this recipe's
        from rtk.prune.select import select_plan

        write_json_atomic(state_path, {"fingerprint": recipe.fingerprint(), "state": None, "select": "select/"})
        return select_plan(setup, partial, echo, f"{recipe.fingerprint()}-{recipe.select.heal.fingerprint()}")
    if saved:
        echo(f"rtk: resuming {partial} at step {len(saved['state']['steps'])} "
             f"({len(saved['state']['removed'])} removed)")
    steps_at_start = len(saved["state"]["removed"]) if saved else 0

    def save(state):
        write_json_atomic(state_path, {"fingerprint": recipe.fingerprint(), "state": state}, indent=2)
        if max_steps is not None and not state["done"] and len(state["removed"]) - steps_at_start >= max_steps:
            raise SearchPaused(f"rtk: paused after {max_steps} step(s) with {len(state['removed'])} removed; "
                               f"state in {partial}; rerun the same command to continue")

    s = recipe.search
    state = removal_order(s.criterion, setup, setup.cands[s.candidates], setup.stop_rule(), s.method, s.normalize,
                          state=saved["state"] if saved else None, save=save, log=lambda m: echo(f"rtk: {m}"),
                          rescoring=s.rescoring)
    return state, None


def _evaluate(setup: Setup, state: dict) -> dict:
    """The evaluation text's PPL of the original and of the pruned model: the original's with the removed sublayers
    skipped (skip == absent: tested; the export verifies the written folder against exactly that)."""
    eval_scorer = scorer_for(setup.recipe, setup.loaded, setup.evalb, False, setup.pool, "evaluation", ppl_only=True)
    removed = frozenset(expand(e["name"] for e in state["removed"]))
    return {**setup.eval_info, "ppl_base": eval_scorer.ppl(frozenset()), "ppl_final": eval_scorer.ppl(removed)}


def _plan(setup: Setup, state: dict, ev: dict, selection: dict | None, t_start: float) -> dict:
    """plan.json (rtk.plan.Plan) of a finished search."""
    recipe, model = setup.recipe, setup.model
    removed_set = frozenset(expand(e["name"] for e in state["removed"]))
    name = model_name(recipe.model)
    n_total, n_counted = setup.params_total, setup.params_counted
    n_after = n_total - sum(param_count(_owner(model, n)) for n in removed_set)
    plan = Plan(
        rtk_version=__version__, model=recipe.model, model_path=setup.loaded.path,
        recipe=recipe.model_dump(mode="json"), recipe_fingerprint=recipe.fingerprint(),
        params_total=n_total, params_after=n_after, params_removed=n_total - n_after,
        params_removed_fraction=(n_total - n_after) / n_total,
        params_counted={"count": recipe.search.target.count, "total": n_counted,
                        "removed_fraction": (n_total - n_after) / n_counted},
        ppl_base=state["ppl_base"], ppl_final=state["ppl_current"],
        calibration={**setup.calib_info, "measured": _measure_line(setup.calib_info, recipe, name)},
        eval={**ev, "measured": _measure_line(setup.eval_info, recipe, name)},
        removed=[{k: e[k] for k in ("name", "layer", "kind", "params", "ri", "nri", "ppl_after", "kl_exp_after")
                  if k in e} for e in state["removed"]],
        removed_sublayers=model_order(removed_set), steps=state["steps"],
        scoring=_scoring_record(recipe, setup.scorer("ppl"), setup.loaded),
        speed={**setup.speed.describe(), "target": recipe.search.target.speedup,
               "predicted_speedup": setup.speed.speedup(removed_set)},
        wall_seconds=round(time.perf_counter() - t_start, 1),
        **({"selection": selection} if selection is not None else {}))
    return plan.model_dump(exclude_unset=True)


def _rewrite_heal_export(setup: Setup, plan: dict, partial: Path, heal_pool, t_start: float, echo) -> dict:
    """OUT.partial/model: the pruned model rewritten (with heal:, healed: plan gets `heal`), exported and verified;
    a model scored from disk is streamed from its files."""
    recipe, loaded = setup.recipe, setup.loaded
    model_dir = partial / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    recipe_yaml = (partial / "recipe.yaml").read_text()
    removed = [e["name"] for e in plan["removed"]]
    if not loaded.in_memory:
        from rtk.export.streamed import export_streamed

        exported = export_streamed(loaded.path, setup.model.config, removed, setup.tokenizer, model_dir,
                                   dtype=recipe.dtype, device=str(loaded.source.device), plan=plan,
                                   recipe_yaml=recipe_yaml)
    else:
        from rtk.export.safetensors import export_model

        model = setup.model.to("cpu") if loaded.offload == "cpu" else setup.model
        final, original = apply_plan(model, removed), model
        if recipe.heal is not None:
            final, plan = _heal(setup, final, model, plan, partial, heal_pool, t_start, echo)
            original = None  # the healed weights differ from the original's: verified against the healed model
        exported = export_model(final, setup.tokenizer, model_dir, original=original, plan=plan,
                                recipe_yaml=recipe_yaml, source=loaded.path)
    if exported["vllm_plugin"]:
        echo(f"rtk: note: the model is {exported['vllm']}")
    return plan


def _heal(setup: Setup, pruned, model, plan: dict, partial: Path, heal_pool, t_start: float, echo):
    """heal:: the pruned model distilled from the original; the plan with its `heal` record."""
    from rtk.heal.run import heal_model, student_copy

    recipe, ev = setup.recipe, plan["eval"]
    healed, rec = heal_model(student_copy(pruned), model, setup.tokenizer, recipe.heal, setup.evalb, setup.eval_info,
                             partial / "heal", _heal_fingerprint(recipe), ppl_before=ev["ppl_final"],
                             progress=setup.progress, echo=echo, pool=heal_pool)
    rec["teacher"] = {"model": recipe.model, "path": setup.loaded.path, "ppl": ev["ppl_base"]}
    return healed, {**plan, "heal": rec, "heal_fingerprint": _heal_fingerprint(recipe),
                    "wall_seconds": round(time.perf_counter() - t_start, 1)}


def _records(plan: dict, partial: Path, recipe: Recipe) -> None:
    """OUT.partial/{plan.json, report.md and its plots}; the healing checkpoints go (the healed model is written)."""
    from rtk.records.prune import write_report

    write_plan(partial / PLAN_FILE, plan)
    write_report(plan, partial, describe(recipe.search.criterion))
    shutil.rmtree(partial / "heal", ignore_errors=True)


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
