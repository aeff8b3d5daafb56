"""`rtk ablate` end to end: load once, search every variant (rtk.ablate.variants), export and evaluate each plan
the same way, write OUT/{ablation.md, ablation.json, plots, models/}.

OUT.partial/state/ holds what is done (score cache, search states, block influence, evaluations) and
is rewritten as work completes, so a rerun of the same command resumes where it stopped.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rtk import __version__, paired
from rtk.ablate.variants import CachedScorer, Variant, ablation_fingerprint, clean_dir, plans, run_all, _key
from rtk.model.cost import H200, ideal_speedup
from rtk.data import token_blocks
from rtk.errors import RtkError
from rtk.model.load import load_model
from rtk.outdir import check_out, load_json, write_json_atomic
from rtk.prune.config import Recipe
from rtk.prune.prepare import prepare
from rtk.model.rewrite import apply_plan
from rtk.model.sublayer import expand, layer_of, model_order
from rtk.prune.search import check_reachable
from rtk.model.params import total_params
from rtk.model.ppl import model_ppl_and_block_nll


def _layers(names, kind: str) -> list[int]:
    return sorted(layer_of(n) for n in expand(names) if n.startswith(kind + "."))


class Evaluator:
    """Exports each distinct plan once (models/<variant>-<pct>) and measures it the same way."""

    def __init__(self, setup, root: Path, cache: dict, save: Callable[[], None], echo: Callable[[str], None] = print):
        self.model, self.tok, self.evalb, self.recipe = setup.model, setup.tokenizer, setup.evalb, setup.recipe
        self.source, self.root, self.cache, self.save, self.echo = setup.loaded.path, root, cache, save, echo
        self.total = setup.params_total
        self.counted = setup.params_counted  # what the targets are fractions of

    def measure(self, removed: list[str], name: str) -> dict:
        key = _key(expand(removed))
        if key in self.cache and (not removed or (self.root / self.cache[key]["model_dir"]).is_dir()):
            return self.cache[key]
        pruned = apply_plan(self.model, removed) if removed else self.model
        ppl, block_nll = model_ppl_and_block_nll(pruned, self.evalb, self.recipe.scoring.batch_size)
        after = total_params(pruned)
        final = self.root / "models" / name
        if removed:  # exported as `rtk prune` exports: verified, servable by vLLM, atomic
            from rtk.export.safetensors import export_model

            if final.exists():
                shutil.rmtree(final)
            export_model(pruned, self.tok, final, original=self.model, source=self.source,
                         plan={"model": self.recipe.model, "removed_sublayers": model_order(expand(removed)),
                               "params_total": self.total,
                               "params_removed": self.total - after, "variant": name})
        cfg, cc = self.model.config, self.recipe.cost
        dec = ideal_speedup(cfg, removed, cc.batch, cc.context, "decode")
        rec = {
            "model_dir": str(final.relative_to(self.root)) if removed else "(dense: " + self.recipe.model + ")",
            "eval_ppl": ppl, "eval_block_nll": block_nll, "params_after": after, "params_removed": self.total - after,
            "params_removed_fraction": (self.total - after) / self.counted,
            "attn_removed": _layers(removed, "attn"), "mlp_removed": _layers(removed, "mlp"),
            "decode_speedup_ideal": dec["speedup"], "kv_cache_ratio": dec["kv_cache_ratio"],
            "decode_speedup_ideal_b1": ideal_speedup(cfg, removed, 1, cc.context, "decode")["speedup"],
            "prefill_speedup_ideal": ideal_speedup(cfg, removed, 1, cc.context, "prefill")["speedup"],
        }
        self.cache[key] = rec
        self.save()
        self.echo(f"rtk: evaluated {name}: {rec['params_removed_fraction']:.1%} removed, eval PPL {ppl:.3f}")
        return rec


def vs_dense(rec: dict, dense: dict) -> Optional[dict]:
    """A folder's zero-shot average minus the dense model's, on the same documents, with its paired 95%
    interval and verdict (rtk.paired); None where either has no per-document scores."""
    a, b = (x.get("zero_shot", {}).get("per_doc") for x in (rec, dense))
    if not a or not b:
        return None
    try:
        return paired.doc_diff(a, b, "acc")
    except ValueError as exc:
        raise RtkError(f"--bench: {exc}") from None


def _zero_shot(rec: Optional[dict]) -> Optional[dict]:
    zs = (rec or {}).get("bench", {}).get("zero_shot", {})
    return zs if zs.get("per_doc") else None


def leads(res: dict) -> dict:
    """Per target, the best variant against the runner-up on the same blocks or documents (rtk.paired): lowest eval
    PPL ("ppl"), after healing ("healed_ppl"), best zero-shot average ("zero_shot"), best zero-shot after healing
    ("healed_zero_shot")."""
    tokens = res["eval"]["seq_len"] - 1
    ppl = lambda a, b: paired.ppl_diff(a, b, [tokens] * len(a))  # noqa: E731
    kinds = {"ppl": (lambda r: r.get("eval_block_nll"), lambda r: -r["eval_ppl"], ppl),
             "healed_ppl": (lambda r: (r.get("healed") or {}).get("eval_block_nll"), lambda r: -r["healed"]["eval_ppl"],
                            ppl),
             "zero_shot": (lambda r: _zero_shot(r), lambda r: _zero_shot(r)["avg_acc"],
                           lambda a, b: paired.doc_diff(a["per_doc"], b["per_doc"], "acc")),
             "healed_zero_shot": (lambda r: _zero_shot(r.get("healed")), lambda r: _zero_shot(r["healed"])["avg_acc"],
                                  lambda a, b: paired.doc_diff(a["per_doc"], b["per_doc"], "acc"))}
    out = {}
    for kind, (get, score, compare) in kinds.items():
        for t in res["targets"]:
            rows = sorted((r for r in res["rows"] if r["target"] == t and get(r)), key=lambda r: -score(r))
            if len(rows) > 1:
                try:
                    lead = compare(get(rows[0]), get(rows[1]))
                except ValueError as exc:
                    raise RtkError(f"--bench: {exc}") from None
                out.setdefault(kind, {})[str(t)] = {"best": rows[0]["variant"], "runner_up": rows[1]["variant"],
                                                    **lead}
    return out


def attach_bench(res: dict, root: Path) -> dict:
    """Put the measurements saved in ROOT/state/bench.json (if any) on the dense record and the rows, each
    folder's zero-shot with its paired difference to the dense model's (zero_shot_vs_dense); then each winner's
    lead over its runner-up (leads)."""
    saved = load_json(Path(root) / "state" / "bench.json", None)
    if saved:
        got = saved["models"]
        dense = got.get("dense", {})
        if "dense" in got:
            res["dense"]["bench"] = got["dense"]
        for r in [*res["rows"], *(r["healed"] for r in res["rows"] if r.get("healed"))]:
            if r["model_dir"] in got:
                r["bench"] = {**got[r["model_dir"]], "zero_shot_vs_dense": vs_dense(got[r["model_dir"]], dense)}
        res["bench_config"] = saved["config"]
        res["paired_rule"] = paired.RULE
    res["leads"] = leads(res)
    return res


def bench_models(res: dict, root: Path, bench, echo: Callable[[str], None] = print) -> dict:
    """Measure the dense model and every distinct plan's folder with `bench` (an
    rtk.ablate.measure.AblationBench), dense first; then, after --heal, every healed folder's zero-shot accuracy
    (its shapes, so its served speed, are its pruned folder's). Each result is saved in ROOT/state/bench.json as
    it completes, so a rerun measures only what is missing; settings that differ from the saved ones are refused."""
    path = Path(root) / "state" / "bench.json"
    conf = bench.describe()
    saved = load_json(path, None)
    if saved is not None and saved.get("config") != conf:
        raise RtkError(f"--bench: {path} holds measurements made with other settings; "
                       "remove it to measure again")
    saved = saved or {"config": conf, "models": {}}
    folders = {"dense": str(res["model_path"])}
    # largest target first: its speedups stand out most from the noise of a shared machine, and a run
    # stopped early has every variant at the same targets
    rows = sorted(res["rows"], key=lambda r: -r["target"])
    for r in rows:
        folders.setdefault(r["model_dir"], str(Path(root) / r["model_dir"]))
    # zero-shot only: nothing to measure on a healed folder under --bench-tasks none
    healed = {r["healed"]["model_dir"]: str(Path(root) / r["healed"]["model_dir"])
              for r in rows if r.get("healed")} if conf["tasks"] else {}
    n = len(folders) + len(healed)
    bench.dense_dir = folders["dense"]
    try:
        for i, (key, folder) in enumerate([*folders.items(), *healed.items()], start=1):
            if key in saved["models"]:
                continue
            echo(f"rtk: bench {i}/{n}: {key}" + (" (zero-shot; served speed is its pruned folder's)"
                                                  if key in healed else ""))
            t0 = time.perf_counter()
            rec = {"zero_shot": bench.quality(folder)} if key in healed else bench.measure(folder, dense=key == "dense")
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            saved["models"][key] = rec
            write_json_atomic(path, saved)
            zs = rec["zero_shot"]
            sp = rec.get("served", {}).get("speedup", {})
            echo((f"rtk:   zero-shot avg acc {zs['avg_acc']:.3f} ({zs['docs']} docs)" if zs["docs"] else
                  "rtk:   zero-shot: none (--bench-tasks none)")
                 + "".join(f"; {w} tok/s x{v['throughput']['median']:.3f}" for w, v in sp.items())
                 + f" ({rec['seconds']:.0f} s)")
    finally:
        bench.close()
    return attach_bench(res, root)


def attach_heal(res: dict, root: Path) -> dict:
    """Put the healings saved in ROOT/state/heal.json (if any) on the rows (`healed`)."""
    saved = load_json(Path(root) / "state" / "heal.json", None)
    if saved:
        for r in res["rows"]:
            if r["model_dir"] in saved["models"]:
                r["healed"] = saved["models"][r["model_dir"]]
        res["heal_config"] = saved["config"]
    return res


def heal_models(res: dict, root: Path, recipe: Recipe, cfg, echo: Callable[[str], None] = print,
                progress: bool = True) -> dict:
    """`rtk ablate --heal`: distil every distinct plan's model from the dense model with the same `cfg`
    (rtk.heal), export it beside the unhealed one (models/<name>-healed) and measure its evaluation PPL.
    Each result is saved in ROOT/state/heal.json as it completes (a rerun heals only what is missing; a
    healing stopped halfway resumes from its checkpoint); other settings than the saved ones are refused."""
    from rtk.export.safetensors import export_model
    from rtk.heal.config import check_heal_text
    from rtk.heal.run import heal_blocks, heal_model, student_copy

    root = Path(root)
    path = root / "state" / "heal.json"
    check_heal_text(cfg, recipe.data.evaluation, "--heal: heal.data")
    saved = load_json(path, None)
    if saved is not None and saved.get("fingerprint") != cfg.fingerprint():
        raise RtkError(f"--heal: {path} holds healings made with other settings; remove it to heal again")
    saved = saved or {"fingerprint": cfg.fingerprint(), "config": cfg.model_dump(mode="json"), "models": {}}
    todo: dict[str, dict] = {}
    for r in sorted(res["rows"], key=lambda r: -r["target"]):
        if r["model_dir"] not in saved["models"]:
            todo.setdefault(r["model_dir"], r)
    if todo:
        model, tokenizer, src = load_model(recipe.model, recipe.dtype, recipe.device)
        evalb, eval_info = token_blocks(tokenizer, recipe.data.evaluation, "data.evaluation")
        pool = None if cfg.data.stream else heal_blocks(tokenizer, cfg.data, cfg.tokens)  # a stream: one each
        for i, (key, r) in enumerate(todo.items(), start=1):
            name = Path(key).name
            echo(f"rtk: heal {i}/{len(todo)}: {key}")
            state_dir = root / "state" / f"heal-{name}"
            healed, rec = heal_model(student_copy(apply_plan(model, r["removed"])), model, tokenizer, cfg, evalb,
                                     eval_info, state_dir, f"{cfg.fingerprint()}-{name}", ppl_before=r["eval_ppl"],
                                     progress=progress, echo=echo, pool=pool)
            hist = rec.pop("history")
            rec["teacher"] = {"model": recipe.model, "path": src, "ppl": res["dense"]["eval_ppl"]}
            final = root / "models" / f"{name}-healed"
            clean_dir(final)
            export_model(healed, tokenizer, final, source=src,
                         plan={"model": recipe.model, "removed_sublayers": model_order(expand(r["removed"])),
                               "params_total": res["params_total"], "params_removed": r["params_removed"],
                               "variant": name, "heal": rec})
            saved["models"][key] = {
                "model_dir": str(final.relative_to(root)), "eval_ppl": rec["eval"]["ppl_after"],
                "eval_ppl_before": rec["eval"]["ppl_before"], "loss_first": rec["loss_first"],
                "loss_last": rec["loss_last"], "tokens": rec["tokens"], "train_seconds": rec["train_seconds"],
                "tokens_per_second": rec["tokens_per_second"], "wall_seconds": rec["wall_seconds"],
                "loss_curve": [[s["tokens"], s["loss"]] for s in hist["steps"]],
                "eval_block_nll": rec["eval"]["block_nll"]}
            write_json_atomic(path, saved)
            clean_dir(state_dir)
    return attach_heal(res, root)


def run_ablation(recipe: Recipe, out: Path, targets: list[float], variants: list[Variant], progress: bool = True,
                 echo: Callable[[str], None] = print, bench=None, report_only: bool = False, heal=None) -> dict:
    """Search, export and evaluate every variant. `report_only`: search nothing; write
    OUT.partial/ablation.* from the searches saved so far (targets reached by unfinished ones).
    `bench` (rtk.ablate.measure.AblationBench): then measure every exported model with it (also when OUT
    is already complete: the measurements are added to it). `heal` (rtk.heal.config.HealConfig): first heal every
    exported model with it (heal_models; also added to a complete OUT)."""
    from rtk.model.device import resolve_runtime

    recipe = resolve_runtime(recipe)
    if recipe.scoring.offload != "none" or recipe.scoring.workers > 1:
        raise RtkError("scoring: offload and workers apply to rtk prune; rtk ablate scores the model in memory "
                       "(set scoring.offload: none and scoring.workers: 1)")
    out, fp = Path(out), ablation_fingerprint(recipe, targets)
    partial, complete = check_out(out, fp, "ablation.json", "state/meta.json", "ablation",
                                  "a different recipe or targets")
    if report_only and not partial.is_dir():
        raise RtkError(f"--report-only: {partial} does not exist (no unfinished ablation to report)")
    if complete:
        return _completed(out, recipe, variants, echo, bench, heal, progress)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    sd = partial / "state"
    setup = prepare(recipe, progress, echo, reach=False, wrap=lambda name, s: _cached(s, sd, name, echo),
                    rank=lambda name, pieces, compute: _ranked(sd, name, pieces, compute))
    try:
        for v in variants:  # fail before any work when a target cannot be reached
            check_reachable(setup.cands[v.candidates], setup.stop_rule(params_removed=max(targets)))
        sd.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sd / "meta.json", {"fingerprint": fp, "targets": targets})
        (partial / "recipe.yaml").write_text(recipe.to_yaml())
        setup.scorer("ppl")
        res = _searched(setup, partial, fp, targets, variants, report_only, t_start, echo)
    finally:
        setup.close()
    if report_only:
        return res
    res = _heal_and_bench(res, partial, recipe, heal, bench, echo, progress)
    partial.rename(out)
    return res


def _heal_and_bench(res: dict, root: Path, recipe: Recipe, heal, bench, echo, progress: bool) -> dict:
    """--heal, then --bench, on the models of ROOT (ablation.* rewritten after each)."""
    from rtk.records.ablation import write_outputs

    if heal is not None:
        res = heal_models(res, root, recipe, heal, echo, progress)
        write_outputs(res, root)
    if bench is not None:
        res = bench_models(res, root, bench, echo)
        write_outputs(res, root)
    return res


def _completed(out: Path, recipe: Recipe, variants: list[Variant], echo, bench, heal, progress: bool) -> dict:
    """OUT already holds this ablation: returned, with its models healed / measured when asked."""
    done = json.loads((out / "ablation.json").read_text())
    missing = [v.name for v in variants if v.name not in done["variants"]]
    if missing:
        raise RtkError(f"-o {out}: complete without variant(s) {', '.join(missing)}; choose another folder")
    if bench is None and heal is None:
        echo(f"rtk: {out} already holds this ablation")
        return done
    echo(f"rtk: {out} already holds this ablation; " + ("healing" if heal else "measuring") + " its models")
    return _heal_and_bench(done, out, recipe, heal, bench, echo, progress)


def _cached(scorer, sd: Path, name: str, echo) -> CachedScorer:
    """A criterion's scorer answering from its cache of values by removed set (state/scores-NAME.json)."""
    path = sd / f"scores-{name}.json"
    c = CachedScorer(scorer, load_json(path, {}))
    c.on_new = lambda: write_json_atomic(path, c.cache)
    if c.cache:
        echo(f"rtk: resuming {sd.parent}: {len(c.cache)} {name} values already measured")
    return c


def _ranked(sd: Path, name: str, pieces: dict, compute) -> dict:
    """A one-pass criterion's scores, measured once (state/rank-NAME.json)."""
    got = load_json(sd / f"rank-{name}.json", None)
    if got is None or set(got) != set(pieces):
        got = compute()
        write_json_atomic(sd / f"rank-{name}.json", got)
    return got


def _searched(setup, partial: Path, fp: str, targets: list[float], variants: list[Variant], report_only: bool,
              t_start: float, echo) -> dict:
    """Every variant searched (or, `report_only`, those saved so far), its plans evaluated, OUT.partial/ablation.*
    written after each."""
    from rtk.records.ablation import write_outputs

    sd = partial / "state"
    states = {v.name: load_json(sd / f"search-{v.name}.json", None) for v in variants}
    states = {k: s for k, s in states.items() if s is not None}
    evals = load_json(sd / "evals.json", {})
    ev = Evaluator(setup, partial, evals, lambda: write_json_atomic(sd / "evals.json", evals), echo)
    dense = ev.measure([], "dense")
    done: list[Variant] = []

    def result() -> dict:
        return _result(setup, fp, targets, states, done, ev, dense, partial, t_start)

    if report_only:
        done.extend(v for v in variants if v.name in states)
    else:
        def after_variant(v: Variant, st: dict) -> None:
            done.append(v)
            write_outputs(result(), partial)

        run_all(variants, setup, setup.params_counted, targets, states,
                save=lambda n, s: write_json_atomic(sd / f"search-{n}.json", s), log=lambda s: echo(f"rtk: {s}"),
                after_variant=after_variant)
    res = result()
    write_outputs(res, partial)
    return res


def _result(setup, fp: str, targets: list[float], states: dict, done: list[Variant], ev: "Evaluator", dense: dict,
            partial: Path, t_start: float) -> dict:
    """ablation.json of the variants done so far."""
    recipe = setup.recipe
    rows = plans(states, done, targets, setup.params_counted)
    blocks = [setup.evalb.shape[1] - 1] * setup.evalb.shape[0]  # predicted tokens per eval block
    for r in rows:
        r.update(ev.measure(r["removed"], f"{r['variant']}-{round(r['target'] * 100)}"))
        if "eval_block_nll" in r and "eval_block_nll" in dense:  # evaluations saved before they were kept: none
            r["eval_vs_dense"] = paired.ppl_diff(r["eval_block_nll"], dense["eval_block_nll"], blocks)
    ppl = setup.scorer("ppl")
    res = {
        "rtk_version": __version__, "fingerprint": fp, "model": recipe.model, "model_path": setup.loaded.path,
        "recipe": recipe.model_dump(mode="json"), "targets": targets, "params_total": setup.params_total,
        "params_counted": {"count": recipe.search.target.count, "total": setup.params_counted},
        "variants": {v.name: {"label": v.label, "candidates": v.candidates, "method": v.method,
                              "normalize": v.normalize, "rank": v.rank,
                              "order": [e["name"] for e in states[v.name]["removed"]]} for v in done},
        "dense": {**dense, "calib_ppl": ppl.ppl(frozenset())},
        "rows": rows, "calibration": setup.calib_info, "eval": setup.eval_info,
        "cost_model": {"hardware": H200.name, "batch": recipe.cost.batch, "context": recipe.cost.context,
                       "normalize_cost": setup.speed.describe()},
        "scoring": {"ppl_evaluations": ppl.inner.evaluations, "cache_hits": ppl.hits, "cache_misses": ppl.misses,
                    "seconds": round(ppl.inner.seconds, 1), "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(), "dtype": recipe.dtype,
                    "device": recipe.device},
        **{f"scoring_{n}": {f"{n}_evaluations": s.inner.evaluations, "cache_hits": s.hits, "cache_misses": s.misses,
                            "seconds": round(s.inner.seconds, 1)} for n, s in setup.scorers.items() if n != "ppl"},
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "block_influence": load_json(partial / "state" / "rank-bi.json", None),
    }
    return attach_bench(attach_heal(res, partial), partial)  # heal first: bench adds to the healed rows
