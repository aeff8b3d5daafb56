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

from rtk import __version__
from rtk.ablate.variants import CachedScorer, Variant, ablation_fingerprint, clean_dir, plans, run_all, _key
from rtk.prune.criteria import block_influence
from rtk.model.cost import H200, ideal_speedup, sublayer_cost_fn
from rtk.data import token_blocks
from rtk.errors import RtkError
from rtk.model.load import load_model
from rtk.outdir import check_out, load_json, write_json_atomic
from rtk.prune.config import Recipe
from rtk.model.rewrite import apply_plan
from rtk.model.sublayer import expand, layer_of, model_order
from rtk.prune.search import StopRule, check_reachable
from rtk.model.params import counted_params, total_params
from rtk.model.ppl import model_ppl
from rtk.prune.scoring import make_scorer, candidates, existing_names



def _layers(names, kind: str) -> list[int]:
    return sorted(layer_of(n) for n in expand(names) if n.startswith(kind + "."))


class Evaluator:
    """Exports each distinct plan once (models/<variant>-<pct>) and measures it the same way."""

    def __init__(self, model, tokenizer, evalb, recipe: Recipe, root: Path, cache: dict, save: Callable[[], None],
                 echo: Callable[[str], None] = print, source: Optional[str] = None):
        self.model, self.tok, self.evalb, self.recipe, self.source = model, tokenizer, evalb, recipe, source
        self.root, self.cache, self.save, self.echo = root, cache, save, echo
        self.total = total_params(model)
        self.counted = counted_params(model, recipe.search.target.count)  # what the targets are fractions of

    def measure(self, removed: list[str], name: str) -> dict:
        key = _key(expand(removed))
        if key in self.cache and (not removed or (self.root / self.cache[key]["model_dir"]).is_dir()):
            return self.cache[key]
        pruned = apply_plan(self.model, removed) if removed else self.model
        ppl = model_ppl(pruned, self.evalb, self.recipe.scoring.batch_size)
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
            "eval_ppl": ppl, "params_after": after, "params_removed": self.total - after,
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


def attach_bench(res: dict, root: Path) -> dict:
    """Put the measurements saved in ROOT/state/bench.json (if any) on the dense record and the rows."""
    saved = load_json(Path(root) / "state" / "bench.json", None)
    if saved:
        got = saved["models"]
        if "dense" in got:
            res["dense"]["bench"] = got["dense"]
        for r in res["rows"]:
            if r["model_dir"] in got:
                r["bench"] = got[r["model_dir"]]
            if r.get("healed") and r["healed"]["model_dir"] in got:
                r["healed"]["bench"] = got[r["healed"]["model_dir"]]
        res["bench_config"] = saved["config"]
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
                "loss_curve": [[s["tokens"], s["loss"]] for s in hist["steps"]]}
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
    from rtk.records.ablation import write_outputs

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
        done = json.loads((out / "ablation.json").read_text())
        missing = [v.name for v in variants if v.name not in done["variants"]]
        if missing:
            raise RtkError(f"-o {out}: complete without variant(s) {', '.join(missing)}; choose another folder")
        if bench is None and heal is None:
            echo(f"rtk: {out} already holds this ablation")
            return done
        echo(f"rtk: {out} already holds this ablation; " + ("healing" if heal else "measuring") + " its models")
        if heal is not None:
            done = heal_models(done, out, recipe, heal, echo, progress)
            write_outputs(done, out)
        if bench is not None:
            done = bench_models(done, out, bench, echo)
        write_outputs(done, out)
        return done
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer, path = load_model(recipe.model, recipe.dtype, recipe.device)
    bad = [p for p in recipe.search.protect if p not in existing_names(model)]
    if bad:
        raise RtkError(f"search.protect: {', '.join(bad)} does not exist in this model")
    calib, calib_info = token_blocks(tokenizer, recipe.data.calibration, "data.calibration")
    evalb, eval_info = token_blocks(tokenizer, recipe.data.evaluation, "data.evaluation")
    cost_fn = sublayer_cost_fn(model.config, recipe.cost)
    cands = {k: candidates(model, k, recipe.search.protect, cost_fn) for k in ("sublayers", "blocks")}
    n_total = total_params(model)
    count = recipe.search.target.count  # the targets count all parameters or the non-embedding ones
    n_counted = counted_params(model, count)
    for v in variants:  # fail before any work when a target cannot be reached
        check_reachable(cands[v.candidates], StopRule(params_total=n_counted, params_removed=max(targets),
                                                      count=count))

    sd = partial / "state"
    sd.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sd / "meta.json", {"fingerprint": fp, "targets": targets})
    (partial / "recipe.yaml").write_text(recipe.to_yaml())
    inner = make_scorer(model, calib, recipe.scoring, progress)
    scorer = CachedScorer(inner, load_json(sd / "scores.json", {}))
    scorer.on_new = lambda: write_json_atomic(sd / "scores.json", scorer.cache)
    if scorer.cache:
        echo(f"rtk: resuming {partial}: {len(scorer.cache)} PPLs already measured")
    states = {v.name: load_json(sd / f"search-{v.name}.json", None) for v in variants}
    states = {k: s for k, s in states.items() if s is not None}

    kl_scorer = []

    def kl() -> CachedScorer:
        """The KL criterion's scorer (rank "kl"), made on first use: the original model's log-probs on the
        calibration blocks, and its own cache of exp(mean KL) by removed set (state/scores-kl.json)."""
        if not kl_scorer:
            from rtk.model.ppl import teacher_logprobs

            ref = teacher_logprobs(model, calib, recipe.scoring.batch_size)
            c = CachedScorer(make_scorer(model, calib, recipe.scoring, progress, teacher_logprobs=ref),
                             load_json(sd / "scores-kl.json", {}))
            c.on_new = lambda: write_json_atomic(sd / "scores-kl.json", c.cache)
            kl_scorer.append(c)
        return kl_scorer[0]

    def bi() -> dict[str, float]:
        got = load_json(sd / "block_influence.json", None)
        if got is None:
            got = block_influence(model, calib, recipe.scoring.batch_size)
            write_json_atomic(sd / "block_influence.json", got)
        return got

    evals = load_json(sd / "evals.json", {})
    ev = Evaluator(model, tokenizer, evalb, recipe, partial, evals, lambda: write_json_atomic(sd / "evals.json", evals),
                   echo, source=path)
    dense = ev.measure([], "dense")
    done: list[Variant] = []

    def result() -> dict:
        rows = plans(states, done, targets, n_counted)
        for r in rows:
            r.update(ev.measure(r["removed"], f"{r['variant']}-{round(r['target'] * 100)}"))
        res = {
            "rtk_version": __version__, "fingerprint": fp, "model": recipe.model, "model_path": path,
            "recipe": recipe.model_dump(mode="json"), "targets": targets, "params_total": n_total,
            "params_counted": {"count": count, "total": n_counted},
            "variants": {v.name: {"label": v.label, "candidates": v.candidates, "method": v.method,
                                  "normalize": v.normalize, "rank": v.rank,
                                  "order": [e["name"] for e in states[v.name]["removed"]]} for v in done},
            "dense": {**dense, "calib_ppl": scorer.ppl(frozenset())},
            "rows": rows, "calibration": calib_info, "eval": eval_info,
            "cost_model": {"hardware": H200.name, "batch": recipe.cost.batch, "context": recipe.cost.context},
            "scoring": {"ppl_evaluations": inner.evaluations, "cache_hits": scorer.hits,
                        "cache_misses": scorer.misses, "seconds": round(inner.seconds, 1),
                        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                        "dtype": recipe.dtype, "device": recipe.device},
            **({"scoring_kl": {"kl_evaluations": kl_scorer[0].inner.evaluations, "cache_hits": kl_scorer[0].hits,
                               "cache_misses": kl_scorer[0].misses, "seconds": round(kl_scorer[0].inner.seconds, 1)}}
               if kl_scorer else {}),
            "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
            "block_influence": load_json(sd / "block_influence.json", None),
        }
        return attach_bench(attach_heal(res, partial), partial)  # heal first: bench adds to the healed rows

    def after_variant(v: Variant, st: dict) -> None:
        done.append(v)
        write_outputs(result(), partial)

    if report_only:
        done.extend(v for v in variants if v.name in states)
        res = result()
        write_outputs(res, partial)
        return res
    run_all(variants, scorer, cands, n_counted, targets, states,
            save=lambda n, s: write_json_atomic(sd / f"search-{n}.json", s), log=lambda s: echo(f"rtk: {s}"),
            bi=bi, after_variant=after_variant, kl=kl)
    res = result()
    write_outputs(res, partial)
    if heal is not None:
        res = heal_models(res, partial, recipe, heal, echo, progress)
        write_outputs(res, partial)
    if bench is not None:
        res = bench_models(res, partial, bench, echo)
        write_outputs(res, partial)
    partial.rename(out)
    return res
