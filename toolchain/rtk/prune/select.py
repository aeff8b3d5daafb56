"""Selection judged after healing (a recipe's `select:`): what the user keeps is the healed model, so plans are
compared healed.

1. Propose: one plan per family x criterion, each reaching search.target (params_removed or speedup):
   - sublayers / blocks: the criterion's removal order over those candidates (rtk.prune.criteria): with ppl or
     kl the recipe's search (progressive by default), with bi removal in ascending block influence (normalized
     as search.normalize says), one-shot, from one pass of the dense model;
   - spans: every run of consecutive layers that reaches the target, the one with the lowest criterion.
2. Judge before healing: every distinct plan's PPL on the judge blocks, held-out calibration text (the judge text
   minus the search's calibration blocks; the recipe refuses the evaluation text).
3. Finalists: the best plan of each family first, then the next best overall, up to `finalists`.
4. Heal each finalist briefly (rtk heal's loop, `select.heal`, on blocks that avoid the judge's) and judge it again:
   by PPL on the judge blocks (per-block NLLs kept), or, with `judge: {tasks: [...], limit: N}`, by lm-eval on the
   last N documents of each task (the healed finalist saved to OUT.partial/select/judge-NAME and run as rtk bench
   runs lm-eval; per-document scores kept). The documents before them are the ones that may report.
5. Decide (`decide`): the best on the judge wins when its lead over every other finalist is outside the paired 95%
   interval (rtk.paired); finalists it cannot be told from are tied, and the fastest of them (predicted speedup:
   the measured profile, or the roofline) wins; the record and the report say it was a tie and who was tied.

State lives in OUT.partial/select/ (every search state, every judgement, the healing checkpoints) so a rerun
resumes. The record (`selection` in plan.json) lists every proposal, which were finalists, and their scores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from rtk.data import cut_blocks, same_text, token_spans
from rtk.errors import RtkError
from rtk.model.sublayer import expand, model_order
from rtk.outdir import write_json_atomic
from rtk.prune.config import TaskJudge, judge_documents, judge_text
from rtk.prune.criteria import CRITERIA, removal_order
from rtk.prune.search import Candidate, StopRule

STATE = "state.json"


def proposal_names(cfg) -> list[str]:
    return [f"{fam}-{crit}" for fam in cfg.families for crit in cfg.criteria]


def judge_blocks(tokenizer, recipe) -> tuple:
    """The judge text's blocks and their record: the judge text minus the search's calibration blocks."""
    sel, cal = recipe.select, recipe.data.calibration
    text = judge_text(sel)
    avoid = token_spans(tokenizer, cal, "data.calibration") if same_text(text, cal) else []
    blocks, info, spans = cut_blocks(tokenizer, text, "select.judge" + (".text" if text is not sel.judge else ""),
                                     avoid)
    return blocks, {**info, "held_out_from": ["data.calibration"] if avoid else []}, spans


def finalist_pool(tokenizer, recipe, judge_spans) -> tuple:
    """The brief healing's training blocks: select.heal.data, minus the judge's blocks when it is the same text."""
    from rtk.heal.run import heal_blocks

    sel = recipe.select
    avoid = judge_spans if same_text(sel.heal.data, judge_text(sel)) else []
    return heal_blocks(tokenizer, sel.heal.data, sel.heal.tokens, "select.heal.data", avoid)


def span_plans(cands: list[Candidate], stop: StopRule) -> dict[str, list[Candidate]]:
    """Every run of consecutive whole layers (blocks candidates, in model order, none protected) that reaches the
    target, shortest from each start: {"span.A-B": its layers}."""
    by_layer = {c.layer: c for c in cands}
    out = {}
    for start in sorted(by_layer):
        run, params, parts = [], 0, []
        for i in range(start, max(by_layer) + 1):
            if i not in by_layer:
                break
            run.append(by_layer[i])
            params += by_layer[i].params
            parts += list(by_layer[i].parts)
            if stop.reached(params, len(run), parts):
                out[f"span.{start}-{i}"] = list(run)
                break
    if not out:
        raise RtkError("select.families: spans: no run of consecutive layers that are not protected reaches "
                       "search.target")
    return out


def _entries(run: list[Candidate], scorer, score: float) -> list[dict]:
    out, gone = [], frozenset()
    for c in run:
        gone = gone | frozenset(c.parts)
        out.append({"name": c.name, "layer": c.layer, "kind": c.kind, "params": c.params, "ri": None, "nri": None,
                    "score": score, "ppl_after": scorer.ppl(gone)})
    return out


def _span(crit: str, setup, stop: StopRule) -> dict:
    """The spans family's plan: of every run of layers that reaches the target, the lowest by `crit`."""
    runs = span_plans(setup.cands["blocks"], stop)
    scores = CRITERIA[crit].piece_scores(setup, runs)
    best = min(scores, key=lambda k: (scores[k], runs[k][0].layer))
    ppl = setup.scorer("ppl")
    removed = _entries(runs[best], ppl, scores[best])
    return {"method": "span", "ppl_base": ppl.ppl(frozenset()), "ppl_current": removed[-1]["ppl_after"],
            "removed": removed, "steps": [{"step": 0, "criterion": crit,
                                           "scores": {k: {crit: v} for k, v in scores.items()}, "chosen": best}],
            "done": True, "criterion": crit}


def propose(name: str, setup, stop: StopRule, state: Optional[dict], save: Callable[[dict], None],
            log: Callable[[str], None]) -> dict:
    """One proposal's search state (resumed from `state`), in run_search's form, in calibration PPL: ppl_base /
    ppl_current, removed, steps."""
    family, crit = name.split("-")
    s = setup.recipe.search
    if family == "spans":
        if state and state.get("done"):
            return state
        state = _span(crit, setup, stop)
        save(state)
        return state
    return removal_order(crit, setup, setup.cands[family], stop, s.method, s.normalize, state=state, save=save,
                         log=lambda m: log(f"{name}: {m}"), rescoring=s.rescoring)


def _order(proposals: list[dict]) -> list[dict]:
    """Finalist order: each family's best before healing (best families first), then the rest by judge PPL."""
    ranked = sorted(proposals, key=lambda p: (p["judge_ppl_before"], p["name"]))
    firsts, seen = [], set()
    for p in ranked:
        if p["family"] not in seen:
            seen.add(p["family"])
            firsts.append(p)
    return firsts + [p for p in ranked if p not in firsts]


class _Saved:
    """OUT.partial/select/state.json: every proposal's search state, every judgement, every healing."""

    def __init__(self, root: Path):
        self.path = root / STATE
        self.data = (json.loads(self.path.read_text()) if self.path.is_file()
                     else {"proposals": {}, "judged": {}, "healed": {}})

    def put(self, part: str, key: str, value) -> None:
        self.data[part][key] = value
        write_json_atomic(self.path, self.data, indent=1)


def _proposals(setup, saved: _Saved, jscorer, echo) -> list[dict]:
    """Every family x criterion's plan, judged before healing."""
    stop, ppl = setup.stop_rule(), setup.scorer("ppl")
    proposals = []
    for name in proposal_names(setup.recipe.select):
        fam, crit = name.split("-")
        echo(f"rtk: select: proposing {name}")
        st = propose(name, setup, stop, saved.data["proposals"].get(name),
                     lambda st, name=name: saved.put("proposals", name, st), echo)
        parts = model_order(expand(e["name"] for e in st["removed"]))
        key = ",".join(parts)
        if key not in saved.data["judged"]:
            saved.put("judged", key, {"judge": jscorer.ppl(frozenset(parts)), "calibration": ppl.ppl(frozenset(parts))})
        judged = saved.data["judged"][key]
        proposals.append({"name": name, "family": fam, "criterion": crit, "method": st["method"],
                          "removed": [e["name"] for e in st["removed"]], "removed_sublayers": parts,
                          "params_removed_fraction": sum(e["params"] for e in st["removed"]) / setup.params_total,
                          "predicted_speedup": setup.speed.speedup(parts), "calibration_ppl": judged["calibration"],
                          "judge_ppl_before": judged["judge"], "_key": key, "_state": st})
    seen = {}
    for p in proposals:
        if p["_key"] in seen:
            p["same_as"] = seen[p["_key"]]
        else:
            seen[p["_key"]] = p["name"]
    return proposals


def judge_on_tasks(healed, setup, name: str, root: Path, echo) -> dict:
    """A healed finalist's lm-eval scores on the judge documents: saved to OUT.partial/select/judge-NAME and run
    as rtk bench's in-process backends run it (rtk.bench.accuracy.harness, lm-eval's `hf` model on the folder),
    on the last `limit` documents of each task (--samples). lm-eval's results and per-document samples stay in
    OUT/select/lm_eval/judge-NAME/ (judge_results_file, relative to OUT)."""
    import shutil

    from rtk.bench.accuracy import harness
    from rtk.bench.accuracy.tasks import prepare as prepare_tasks
    from rtk.export.safetensors import export_model

    j, recipe = setup.recipe.select.judge, setup.recipe
    folder = root / f"judge-{name}"
    if folder.exists():
        shutil.rmtree(folder)
    export_model(healed, setup.tokenizer, folder, source=setup.loaded.path)
    taskset = prepare_tasks(j.tasks)
    spec = harness.hf_run(str(folder), taskset, None, dtype=recipe.dtype, device=recipe.device)
    spec.samples = {taskset.lm_eval_name(t): list(judge_documents(t, j.limit)) for t in j.tasks}
    run = harness.run(spec, root, f"judge-{name}", lambda m: echo(m.replace("rtk bench:", "rtk: select:", 1)))
    shutil.rmtree(folder)  # the healed weights are not kept (its record, once saved, is what select reuses)
    per = {t: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "n")} for t, r in run["tasks"].items()}
    score = sum(r[j.metric] for r in per.values()) / len(per)
    return {"judge_score": score, "judge_tasks": per, "judge_per_doc": run["per_doc"],
            "judge_command": run["command"], "judge_seconds": run["seconds"],
            "judge_results_file": str(Path(run["results_file"]).relative_to(root.parent))}  # lm-eval's samples beside


def check_judge(sel) -> None:
    """A task judge's lm-eval and task files, checked before any work (one line each)."""
    if not isinstance(sel.judge, TaskJudge):
        return
    import importlib.util

    from rtk import pip_install
    from rtk.bench.accuracy.tasks import prepare as prepare_tasks

    if importlib.util.find_spec("lm_eval") is None:
        raise RtkError(f"select.judge.tasks: lm-eval is not installed ({pip_install('eval')}); or judge on text")
    prepare_tasks(sel.judge.tasks)


def task_judge_record(j: TaskJudge) -> dict:
    """Which documents judged (the last `limit` of each task, indices from 0) and which may report."""
    docs = {t: judge_documents(t, j.limit) for t in j.tasks}
    return {"kind": "tasks", "metric": j.metric, "limit": j.limit,
            "tasks": {t: {"judge_documents": [r.start, r.stop - 1], "of": r.stop,
                          "reporting_documents": [0, (j.report or r.start) - 1]} for t, r in docs.items()},
            "reporting": f"the first {j.report} documents of each task (rtk bench --limit {j.report})" if j.report
            else "each task's documents before its judge documents (rtk bench --limit N with N at most "
                 + ", ".join(f"{t}: {r.start}" for t, r in docs.items()) + ")"}


def _judged(rec: Optional[dict], by_tasks: bool) -> bool:
    """Whether a saved healing carries what the judge compares (per-block NLLs, or per-document task scores)."""
    return bool(rec) and ("judge_per_doc" in rec if by_tasks else "judge_block_nll" in rec)


def _heal_finalists(setup, finalists: list[dict], saved: _Saved, judge: tuple, pool, root: Path, heal_fp: str,
                    echo) -> None:
    """Each finalist healed briefly and judged again (its record updated; healings already saved are reused)."""
    import shutil

    from rtk.heal.run import heal_model, student_copy
    from rtk.model.rewrite import apply_plan

    jblocks, jinfo = judge
    by_tasks = isinstance(setup.recipe.select.judge, TaskJudge)
    for k, p in enumerate(finalists, 1):
        if not _judged(saved.data["healed"].get(p["_key"]), by_tasks):
            echo(f"rtk: select: healing finalist {k}/{len(finalists)}: {p['name']} "
                 f"(judge PPL before {p['judge_ppl_before']:.3f})")
            student = student_copy(apply_plan(setup.model, p["removed"]))
            state_dir = root / f"heal-{p['name']}"
            healed, rec = heal_model(student, setup.model, setup.tokenizer, setup.recipe.select.heal, jblocks, jinfo,
                                     state_dir, f"{heal_fp}-{p['_key']}",
                                     ppl_before=p["judge_ppl_before"], progress=setup.progress, echo=echo, pool=pool)
            got = {"judge_ppl_after": rec["eval"]["ppl_after"], "loss_first": rec["loss_first"],
                   "loss_last": rec["loss_last"], "train_seconds": rec["train_seconds"], "tokens": rec["tokens"],
                   "judge_block_nll": rec["eval"]["block_nll"]}
            if by_tasks:
                got.update(judge_on_tasks(healed, setup, p["name"], root, echo))
            del student, healed
            saved.put("healed", p["_key"], got)
            shutil.rmtree(state_dir)  # judged and saved: its healing checkpoint (the model's size) is not needed
        p.update(saved.data["healed"][p["_key"]])
        p["finalist"] = k


def decide(finalists: list[dict], metric: Optional[str] = None, block_tokens: Optional[list[int]] = None) -> dict:
    """The decision rule with ties. The best finalist on the judge (highest task score, or lowest judge PPL after
    healing) wins when its lead over every other finalist is outside the paired 95% interval (rtk.paired, on the
    same documents or blocks); else the finalists it cannot be told from are tied, and the fastest of them
    (predicted_speedup: the measured profile, or the roofline) wins. `metric`: judged on tasks (per-document
    `judge_per_doc`), else on PPL (per-block `judge_block_nll`, `block_tokens` predicted tokens per block).
    Returns the decision record."""
    from rtk import paired

    if metric:
        best = max(finalists, key=lambda p: (p["judge_score"], -p["finalist"]))
        compare = lambda p: paired.doc_diff(best["judge_per_doc"], p["judge_per_doc"], metric)  # noqa: E731
    else:
        best = min(finalists, key=lambda p: (p["judge_ppl_after"], p["finalist"]))
        compare = lambda p: paired.ppl_diff(best["judge_block_nll"], p["judge_block_nll"], block_tokens)  # noqa: E731
    leads = {p["name"]: compare(p) for p in finalists if p is not best}
    tied = [best] + [p for p in finalists if p is not best and leads[p["name"]]["verdict"] != "better"]
    winner = max(tied, key=lambda p: (p["predicted_speedup"], p is best, -p["finalist"]))
    return {"best_on_judge": best["name"], "winner": winner["name"], "tie": len(tied) > 1,
            "tied": [p["name"] for p in tied], "leads": leads, "paired_rule": paired.RULE}


def select_plan(setup, partial: Path, echo: Callable[[str], None], heal_fp: str) -> tuple[dict, dict]:
    """(the winner's search state, calibration PPLs in ppl_base / ppl_current; the `selection` record)."""
    from rtk.prune.scoring import scorer_for

    sel = setup.recipe.select
    root = partial / "select"
    root.mkdir(parents=True, exist_ok=True)
    saved = _Saved(root)
    jblocks, jinfo, jspans = judge_blocks(setup.tokenizer, setup.recipe)
    jscorer = scorer_for(setup.recipe, setup.loaded, jblocks, False, setup.pool, "judge", ppl_only=True)
    proposals = _proposals(setup, saved, jscorer, echo)
    finalists = _order([p for p in proposals if "same_as" not in p])[: sel.finalists]
    pool = finalist_pool(setup.tokenizer, setup.recipe, jspans)
    _heal_finalists(setup, finalists, saved, (jblocks, jinfo), pool, root, heal_fp, echo)
    by_tasks = isinstance(sel.judge, TaskJudge)
    decision = decide(finalists, sel.judge.metric if by_tasks else None, [jblocks.shape[1] - 1] * jblocks.shape[0])
    winner = next(p for p in finalists if p["name"] == decision["winner"])
    echo(f"rtk: select: {winner['name']} wins"
         + (f" a tie with {', '.join(n for n in decision['tied'] if n != winner['name'])} (no difference shown on "
            "the judge; the fastest wins)" if decision["tie"] else "")
         + (f": judge {sel.judge.metric} {winner['judge_score']:.3f}" if by_tasks else "")
         + f"; judge PPL {winner['judge_ppl_before']:.3f} -> {winner['judge_ppl_after']:.3f} after healing, "
         f"predicted {winner['predicted_speedup']:.3f}x")
    record = {
        "winner": winner["name"],
        "rule": ("highest " + f"mean {sel.judge.metric} over {', '.join(sel.judge.tasks)}" if by_tasks
                 else "lowest judge PPL") + " after the brief healing, among the finalists (each family's best "
                "before healing first, then the next best); a lead inside the paired 95% interval is a tie, "
                "which the fastest tied finalist (predicted speedup) wins",
        "decision": decision,
        "speed_model": setup.speed.describe(),
        "judge": {**jinfo, **(task_judge_record(sel.judge) if by_tasks else {"kind": "ppl"})},
        "heal": sel.heal.model_dump(mode="json"),
        "heal_data": {k: pool[1][k] for k in ("text", "samples", "seq_len", "tokens") if k in pool[1]},
        "finalists": sel.finalists,
        "proposals": [{k: v for k, v in p.items() if not k.startswith("_")} for p in proposals],
    }
    ppl, state = setup.scorer("ppl"), winner["_state"]
    gone = frozenset(expand(e["name"] for e in state["removed"]))
    return {**state, "ppl_base": ppl.ppl(frozenset()), "ppl_current": ppl.ppl(gone)}, record
