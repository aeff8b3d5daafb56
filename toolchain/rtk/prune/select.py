"""Selection judged after healing (a recipe's `select:`): what the user keeps is the healed model, so plans are
compared healed.

1. Propose: one plan per family x criterion, each reaching search.target (params_removed or speedup):
   - sublayers / blocks with ppl or kl: the recipe's search (progressive by default) over those candidates,
     scored by calibration PPL or by KL from the original model (rtk.prune.scoring, `teacher_logprobs`);
   - sublayers / blocks with bi: removal in ascending block influence (normalized as search.normalize says),
     one-shot, from one pass of the dense model (rtk.prune.criteria);
   - spans: every run of consecutive layers that reaches the target, the one with the lowest criterion.
2. Judge before healing: every distinct plan's PPL on the judge blocks, held-out calibration text (the judge text
   minus the search's calibration blocks; the recipe refuses the evaluation text).
3. Finalists: the best plan of each family first, then the next best overall, up to `finalists`.
4. Heal each finalist briefly (rtk heal's loop, `select.heal`, on blocks that avoid the judge's) and judge it again;
   the lowest judge PPL after healing wins.

State lives in OUT.partial/select/ (every search state, every judgement, the healing checkpoints) so a rerun
resumes. The record (`selection` in plan.json) lists every proposal, which were finalists, and their scores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from rtk.data import cut_blocks, same_text, token_spans
from rtk.errors import RtkError
from rtk.model.params import total_params
from rtk.model.sublayer import expand, model_order
from rtk.outdir import write_json_atomic
from rtk.prune.criteria import boundary_influence, candidate_influence
from rtk.prune.search import (Candidate, StopRule, kl_removals_in_calibration_ppl, normalized, ranked_removal,
                              run_search)

STATE = "state.json"


def proposal_names(cfg) -> list[str]:
    return [f"{fam}-{crit}" for fam in cfg.families for crit in cfg.criteria]


def judge_blocks(tokenizer, recipe) -> tuple:
    """The judge's blocks and their record: the judge text minus the search's calibration blocks."""
    sel, cal = recipe.select, recipe.data.calibration
    avoid = token_spans(tokenizer, cal, "data.calibration") if same_text(sel.judge, cal) else []
    blocks, info, spans = cut_blocks(tokenizer, sel.judge, "select.judge", avoid)
    return blocks, {**info, "held_out_from": ["data.calibration"] if avoid else []}, spans


def finalist_pool(tokenizer, recipe, judge_spans) -> tuple:
    """The brief healing's training blocks: select.heal.data, minus the judge's blocks when it is the same text."""
    from rtk.heal.run import heal_blocks

    sel = recipe.select
    avoid = judge_spans if same_text(sel.heal.data, sel.judge) else []
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


def propose(name: str, *, model, calib, scorers: dict, cands: dict, stop: StopRule, recipe,
            state: Optional[dict], save: Callable[[dict], None], log: Callable[[str], None]) -> dict:
    """One proposal's search state (resumed from `state`), in run_search's form: ppl_base / ppl_current in its
    criterion's units (PPL, or exp(mean KL) for kl), removed, steps."""
    family, crit = name.split("-")
    s = recipe.search
    if state and state.get("done"):
        return state
    if family == "spans":
        runs = span_plans(cands["blocks"], stop)
        if crit == "bi":
            got = boundary_influence(model, calib, [(2 * r[0].layer, 2 * (r[-1].layer + 1)) for r in runs.values()],
                                     recipe.scoring.batch_size)
            scores = {k: got[(2 * r[0].layer, 2 * (r[-1].layer + 1))] for k, r in runs.items()}
        else:
            scores = {k: scorers[crit].ppl(frozenset(p for c in r for p in c.parts)) for k, r in runs.items()}
        best = min(scores, key=lambda k: (scores[k], runs[k][0].layer))
        removed = _entries(runs[best], scorers["ppl"], scores[best])
        state = {"method": "span", "ppl_base": scorers["ppl"].ppl(frozenset()),
                 "ppl_current": removed[-1]["ppl_after"], "removed": removed,
                 "steps": [{"step": 0, "criterion": crit, "scores": {k: {crit: v} for k, v in scores.items()},
                            "chosen": best}], "done": True}
    elif crit == "bi":
        cs = cands[family]
        bi = candidate_influence(model, calib, [c.name for c in cs], recipe.scoring.batch_size)
        ranking = {c.name: normalized(bi[c.name], c, s.normalize) for c in cs}
        state = ranked_removal(ranking, cs, stop, scorers["ppl"], scorers["ppl"].ppl(frozenset()))
        state["steps"] = [{"step": 0, "criterion": "bi", "scores": {c.name: {"bi": bi[c.name],
                                                                            "nri": ranking[c.name]} for c in cs}}]
    else:
        state = run_search(scorers[crit], cands[family], stop, s.method, s.normalize, state=state, save=save,
                           log=lambda m: log(f"{name}: {m}"), rescoring=s.rescoring)
        if crit == "kl":  # ppl_after stays calibration PPL in every plan.json; the search's own value beside it
            kl_removals_in_calibration_ppl(state["removed"], scorers["ppl"])
    state["criterion"] = crit
    save(state)
    return state


def _order(proposals: list[dict]) -> list[dict]:
    """Finalist order: each family's best before healing (best families first), then the rest by judge PPL."""
    ranked = sorted(proposals, key=lambda p: (p["judge_ppl_before"], p["name"]))
    firsts, seen = [], set()
    for p in ranked:
        if p["family"] not in seen:
            seen.add(p["family"])
            firsts.append(p)
    return firsts + [p for p in ranked if p not in firsts]


def select_plan(recipe, model, tokenizer, calib, scorers: dict, cands: dict, stop: StopRule, speed, judge,
                partial: Path, progress: bool, echo: Callable[[str], None], heal_fp: str) -> tuple[dict, dict]:
    """(the winner's search state, the `selection` record). `judge` = (blocks, info, spans, judge scorer)."""
    from rtk.heal.run import heal_model, student_copy
    from rtk.model.rewrite import apply_plan

    sel = recipe.select
    root = partial / "select"
    root.mkdir(parents=True, exist_ok=True)
    path = root / STATE
    saved = json.loads(path.read_text()) if path.is_file() else {"proposals": {}, "judged": {}, "healed": {}}

    def persist():
        write_json_atomic(path, saved, indent=1)

    jblocks, jinfo, jspans, jscorer = judge
    n_total = total_params(model)
    proposals = []
    for name in proposal_names(sel):
        fam, crit = name.split("-")
        echo(f"rtk: select: proposing {name}")

        def save(st, name=name):
            saved["proposals"][name] = st
            persist()

        st = propose(name, model=model, calib=calib, scorers=scorers, cands=cands, stop=stop, recipe=recipe,
                     state=saved["proposals"].get(name), save=save, log=echo)
        parts = model_order(expand(e["name"] for e in st["removed"]))
        key = ",".join(parts)
        if key not in saved["judged"]:
            saved["judged"][key] = {"judge": jscorer.ppl(frozenset(parts)),
                                    "calibration": scorers["ppl"].ppl(frozenset(parts))}
            persist()
        removed_params = sum(e["params"] for e in st["removed"])
        proposals.append({"name": name, "family": fam, "criterion": crit, "method": st["method"],
                          "removed": [e["name"] for e in st["removed"]], "removed_sublayers": parts,
                          "params_removed_fraction": removed_params / n_total,
                          "predicted_speedup": speed.speedup(parts),
                          "calibration_ppl": saved["judged"][key]["calibration"],
                          "judge_ppl_before": saved["judged"][key]["judge"], "_key": key, "_state": st})
    distinct, seen = [], {}
    for p in proposals:
        if p["_key"] in seen:
            p["same_as"] = seen[p["_key"]]
        else:
            seen[p["_key"]] = p["name"]
            distinct.append(p)
    finalists = _order(distinct)[: sel.finalists]
    pool = finalist_pool(tokenizer, recipe, jspans)
    for k, p in enumerate(finalists, 1):
        if p["_key"] not in saved["healed"]:
            echo(f"rtk: select: healing finalist {k}/{len(finalists)}: {p['name']} "
                 f"(judge PPL before {p['judge_ppl_before']:.3f})")
            student = student_copy(apply_plan(model, p["removed"]))
            _, rec = heal_model(student, model, tokenizer, sel.heal, jblocks, jinfo, root / f"heal-{p['name']}",
                                f"{heal_fp}-{p['_key']}", ppl_before=p["judge_ppl_before"], progress=progress,
                                echo=echo, pool=pool)
            del student
            saved["healed"][p["_key"]] = {"judge_ppl_after": rec["eval"]["ppl_after"],
                                          "loss_first": rec["loss_first"], "loss_last": rec["loss_last"],
                                          "train_seconds": rec["train_seconds"], "tokens": rec["tokens"]}
            persist()
        p.update(saved["healed"][p["_key"]])
        p["finalist"] = k
    winner = min(finalists, key=lambda p: (p["judge_ppl_after"], p["finalist"]))
    echo(f"rtk: select: {winner['name']} wins: judge PPL {winner['judge_ppl_before']:.3f} -> "
         f"{winner['judge_ppl_after']:.3f} after healing, predicted {winner['predicted_speedup']:.3f}x")
    state = winner["_state"]
    record = {
        "winner": winner["name"],
        "rule": "lowest judge PPL after the brief healing, among the finalists (each family's best before healing "
                "first, then the next best)",
        "judge": {k: v for k, v in jinfo.items()},
        "heal": sel.heal.model_dump(mode="json"),
        "heal_data": {k: pool[1][k] for k in ("text", "samples", "seq_len", "tokens") if k in pool[1]},
        "finalists": sel.finalists,
        "proposals": [{k: v for k, v in p.items() if not k.startswith("_")} for p in proposals],
    }
    return state, record
