"""Speed as a target (`search.target.speedup`, predicted by a measured profile, rtk.model.speed, or the roofline)
and the cheaper search (`search.rescoring: lazy`)."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, tiny_rtk


def test_fit_recovers_the_shares_and_predicts():
    from rtk.model.speed import fit_profile
    from rtk.model.sublayer import expand

    cfg = tiny_rtk("llama", layers=6).config
    share = {"attn": 0.02, "mlp": 0.05}
    plans = [["attn.1", "attn.2"], ["mlp.3"], ["layer.4", "attn.5"], ["mlp.1", "mlp.2", "attn.3"]]
    pts = [(p, 1 / (1 - sum(share[n.split(".")[0]] for n in expand(p)))) for p in plans]
    prof = fit_profile(pts, engine="e", machine="m", workload="w", metric="tok/s", config=cfg)
    assert prof.share == pytest.approx(share, rel=1e-9)
    assert prof.speedup([]) == 1.0
    assert prof.speedup(["layer.0"]) == pytest.approx(1 / (1 - 0.07))
    assert json.loads(json.dumps(prof.to_json())) == prof.to_json()


def test_fit_needs_both_kinds_in_different_proportions():
    from rtk.errors import RtkError
    from rtk.model.speed import fit_profile

    cfg = tiny_rtk("llama", layers=4).config
    with pytest.raises(RtkError, match="both kinds"):
        fit_profile([(["attn.1"], 1.05), (["attn.1", "attn.2"], 1.1)], engine="e", machine="m", workload="w",
                    metric="x", config=cfg)


def test_a_profile_of_another_model_or_engine_is_refused(tmp_path):
    from rtk.errors import RtkError
    from rtk.model.speed import fit_profile, load_profile

    small, other = tiny_rtk("llama", layers=4).config, tiny_rtk("llama", layers=6).config
    prof = fit_profile([(["attn.1"], 1.02), (["mlp.1"], 1.05)], engine="vLLM-CPU", machine="m", workload="w",
                       metric="x", config=small)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(prof.to_json()))
    assert load_profile(f, small).share == prof.share
    with pytest.raises(RtkError, match=r"cost.profile: .*num_hidden_layers=4, this model has 6"):
        load_profile(f, other)
    with pytest.raises(RtkError, match="measured on 'vLLM-CPU', the recipe serves with 'vLLM-CUDA'"):
        load_profile(f, small, engine="vLLM-CUDA")
    f.write_text(json.dumps({"share": {}}))
    with pytest.raises(RtkError, match="not a speed profile"):
        load_profile(f, small)


class Scripted:
    """PPL grows with what is removed; MLPs cost more PPL than attention."""

    def __init__(self):
        self.evaluations = 0

    def ppl(self, removed):
        return 10.0 * math.exp(sum(0.01 * (1 + int(n.split(".")[1])) * (3 if n.startswith("mlp") else 1)
                                   for n in removed))

    def score(self, removed, cands):
        return {c.name: self.ppl(removed | set(c.parts)) for c in cands}


@pytest.mark.parametrize("method", ["progressive", "one-shot"])
def test_speed_target_stops_at_the_budget(method):
    """The search removes until the predicted speedup reaches the target, and not one sublayer more."""
    from rtk.model.speed import SpeedModel
    from rtk.prune.config import CostConfig
    from rtk.prune.scoring import candidates
    from rtk.prune.search import StopRule, run_search

    model = tiny_rtk("llama", layers=6)
    speed = SpeedModel(model.config, CostConfig(batch=1, context=128))
    cands = candidates(model, "sublayers", ["attn.0"])
    for target in (1.1, 1.4):
        stop = StopRule(params_total=10 ** 6, speedup=target, speed=speed.speedup)
        st = run_search(Scripted(), cands, stop, method, "none")
        names = [e["name"] for e in st["removed"]]
        assert speed.speedup(names) >= target > speed.speedup(names[:-1])


def test_speed_target_that_no_plan_reaches_is_one_line(tmp_path, tiny_folder):
    from rtk.cli import main

    rec = {"model": str(tiny_folder), "data": {"calibration": {"samples": 2, "seq_len": 32},
                                                "evaluation": {"split": "test", "samples": 2, "seq_len": 32}},
           "search": {"target": {"speedup": 50.0}}, "cost": {"batch": 1, "context": 128}}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(rec))
    r = CliRunner().invoke(main, ["prune", str(f), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("Error: search.target.speedup: 50") and "cannot be reached" in line and "roofline" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_prune_to_a_speed_target_records_the_prediction(tmp_path, tiny_folder):
    from rtk.cli import main
    from rtk.model.speed import SpeedModel

    rec = {"model": str(tiny_folder), "data": {"calibration": {"samples": 2, "seq_len": 32},
                                                "evaluation": {"split": "test", "samples": 2, "seq_len": 32}},
           "search": {"target": {"speedup": 1.03}, "normalize": "cost"},  # the 49k-token head caps it at 1.05x
           "cost": {"batch": 1, "context": 128, "phase": "decode"}}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(rec))
    r = CliRunner().invoke(main, ["prune", str(f), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    sp = plan["speed"]
    assert sp["model"] == "roofline" and sp["target"] == 1.03 and sp["predicted_speedup"] >= 1.03
    from rtk.model.load import load_model

    cfg = load_model(str(tiny_folder))[0].config
    from rtk.prune.config import CostConfig

    assert sp["predicted_speedup"] == pytest.approx(SpeedModel(cfg, CostConfig(batch=1, context=128)).speedup(
        plan["removed_sublayers"]))
    assert "speedup" in (tmp_path / "out" / "report.md").read_text()


def test_recipes_from_before_keep_their_fingerprint():
    """New recipe keys at their defaults leave the fingerprint (and so resume and reuse) as it was: the demo
    recipe's is the one its recorded plan.json holds."""
    from rtk.model.device import resolve_runtime
    from rtk.prune.config import load_recipe

    recorded = json.loads((REPO / "bench" / "results" / "demo-2026-12-03" / "prune" / "plan.json").read_text())
    assert resolve_runtime(load_recipe(REPO / "recipes" / "smollm2-demo.yaml")).fingerprint() == \
        recorded["recipe_fingerprint"] == "07fa978e7b04f4ae"


# ---- cheaper search ------------------------------------------------------------------------------------------
def monotone(names, seed=1):
    """test_ablate's scripted PPL, 10 exp(singles + pairwise terms >= 0), over `names` (attn.i, mlp.i of 8 layers):
    removing a sublayer never lowers another's RI, so lazy re-scoring must pick what full re-scoring picks.
    `evaluations` counts the PPLs it was asked for."""
    from test_ablate import Scripted

    s = Scripted(len(names) // 2, seed)
    assert sorted(s.single) == sorted(names)
    return s


def evaluations(scorer) -> int:
    return len(scorer.asked)


@pytest.mark.parametrize("normalize", ["params", "none"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lazy_rescoring_gives_the_identical_plan_with_fewer_evaluations(normalize, seed):
    from rtk.prune.search import Candidate, StopRule, run_search

    cands = [Candidate(f"{k}.{i}", i, k, 10 if k == "attn" else 30) for i in range(8) for k in ("attn", "mlp")]
    stop = StopRule(params_total=400, params_removed=0.5)
    full, lazy = monotone([c.name for c in cands], seed), monotone([c.name for c in cands], seed)
    a = run_search(full, cands, stop, "progressive", normalize)
    b = run_search(lazy, cands, stop, "progressive", normalize, rescoring="lazy")
    assert [e["name"] for e in a["removed"]] == [e["name"] for e in b["removed"]]
    assert [e["ppl_after"] for e in a["removed"]] == [e["ppl_after"] for e in b["removed"]]
    assert evaluations(lazy) < evaluations(full)
    assert b["steps"][0].get("lazy") is None and all(s["lazy"] for s in b["steps"][1:])


def test_lazy_rescoring_resumes_to_the_same_plan():
    from rtk.prune.search import Candidate, StopRule, run_search

    cands = [Candidate(f"{k}.{i}", i, k, 10 if k == "attn" else 30) for i in range(6) for k in ("attn", "mlp")]
    stop = StopRule(params_total=240, params_removed=0.5)
    whole = run_search(monotone([c.name for c in cands]), cands, stop, "progressive", "params", rescoring="lazy")

    class Stop(Exception):
        pass

    saved = {}

    def save(st):
        saved["state"] = json.loads(json.dumps(st))
        if len(st["removed"]) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_search(monotone([c.name for c in cands]), cands, stop, "progressive", "params", save=save,
                   rescoring="lazy")
    resumed = run_search(monotone([c.name for c in cands]), cands, stop, "progressive", "params",
                         state=saved["state"], rescoring="lazy")
    assert [e["name"] for e in resumed["removed"]] == [e["name"] for e in whole["removed"]]


def test_lazy_rescoring_is_for_progressive_search():
    from rtk.errors import RtkError
    from rtk.prune.config import parse_recipe

    with pytest.raises(RtkError, match="rescoring: lazy applies to method: progressive"):
        parse_recipe({"model": "m", "search": {"method": "one-shot", "rescoring": "lazy"}})


# ---- global search --------------------------------------------------------------------------------------------
def test_cover_knapsack_is_exact_on_small_instances():
    import itertools
    import random

    from rtk.prune.search import cover_knapsack

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(2, 9)
        w = [rng.choice([3, 5, 8, 13]) for _ in range(n)]
        c = [rng.uniform(-0.2, 1.0) for _ in range(n)]
        need = rng.randint(1, sum(w))
        got = cover_knapsack(w, c, need)
        assert sum(w[i] for i in got) >= need
        best = min(sum(c[i] for i in s) for k in range(n + 1) for s in itertools.combinations(range(n), k)
                   if sum(w[i] for i in s) >= need)
        assert sum(c[i] for i in got) <= best + 1e-12


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("target", [0.2, 0.35])
def test_global_search_is_never_worse_than_greedy_on_its_objective(seed, target):
    """Objective: the summed step-0 RI of the removed set at the target. Greedy (one-shot, RI / params) takes a
    prefix of the ranking; global solves the knapsack."""
    from rtk.prune.search import Candidate, StopRule, run_search

    cands = [Candidate(f"{k}.{i}", i, k, 10 if k == "attn" else 30) for i in range(8) for k in ("attn", "mlp")]
    stop = StopRule(params_total=400, params_removed=target)
    greedy = run_search(monotone([c.name for c in cands], seed), cands, stop, "one-shot", "params")
    best = run_search(monotone([c.name for c in cands], seed), cands, stop, "global", "params")
    ri = greedy["steps"][0]["scores"]
    objective = lambda st: sum(ri[e["name"]]["ri"] for e in st["removed"])  # noqa: E731
    assert sum(e["params"] for e in best["removed"]) >= target * 400
    assert objective(best) <= objective(greedy) + 1e-12
    assert best["steps"][0]["chosen"] and {e["name"] for e in best["removed"]} <= set(best["steps"][0]["chosen"])


def test_global_search_needs_a_params_target():
    from rtk.errors import RtkError
    from rtk.prune.config import parse_recipe

    with pytest.raises(RtkError, match="method: global supports target params_removed"):
        parse_recipe({"model": "m", "search": {"method": "global", "target": {"sublayers": 3}}})
