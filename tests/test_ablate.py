"""rtk ablate: variants, shared work, nested progressive prefixes, block influence, cost arithmetic."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rtk.prune.scoring.influence import piece_influence
from rtk.ablate.variants import (RUN_ORDER, VARIANTS, CachedScorer, Variant, parse_targets, prefix_for, run_all,
                                select_variants)
from rtk.prune.search import ranked_removal
from rtk.model.cost import Hardware, ideal_speedup, model_cost, sublayer_cost, sublayer_cost_fn, sublayer_kernels
from rtk.errors import RtkError
from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM
from rtk.prune.config import CostConfig
from rtk.model.rewrite import pruned_config
from rtk.prune.search import Candidate, StopRule, run_search

from conftest import REPO, tiny_hf, tiny_rtk


# ---------------------------------------------------------------- scripted scorer and candidates

class Scripted:
    """PPL as a fixed function of the removed set, with pairwise interactions (so progressive and
    one-shot differ); records every set it is asked about."""

    def __init__(self, n_layers: int = 6, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        names = [f"{k}.{i}" for i in range(n_layers) for k in ("attn", "mlp")]
        self.single = {n: float(v) for n, v in zip(names, torch.rand(len(names), generator=g) * 0.3 - 0.02)}
        self.pair = {(a, b): float(torch.rand(1, generator=g)) * 0.05 for a in names for b in names if a < b}
        self.asked: list[frozenset] = []
        self.score_calls = 0

    def _ppl(self, removed) -> float:
        rs = sorted(removed)
        x = sum(self.single[n] for n in rs) + sum(self.pair[(a, b)] for i, a in enumerate(rs) for b in rs[i + 1:])
        return 10.0 * math.exp(x)

    def ppl(self, removed):
        self.asked.append(frozenset(removed))
        return self._ppl(removed)

    def score(self, removed, cands):
        self.score_calls += 1
        out = {}
        for c in cands:
            self.asked.append(frozenset(removed | set(c.parts)))
            out[c.name] = self._ppl(removed | set(c.parts))
        return out


def make_cands(n_layers: int = 6):
    attn, mlp = 10, 30
    subs, blocks = [], []
    for i in range(n_layers):
        subs += [Candidate(f"attn.{i}", i, "attn", attn, cost=5.0 + i), Candidate(f"mlp.{i}", i, "mlp", mlp, cost=2.0)]
        blocks.append(Candidate(f"layer.{i}", i, "layer", attn + mlp, cost=7.0 + i))
    subs = [c for c in subs if c.name != "attn.0"]
    blocks = blocks[1:]
    return {"sublayers": subs, "blocks": blocks}, 400  # params total (embeddings included)


PPL_VARIANTS = [v for v in VARIANTS if v.rank == "ppl"]


class Shared:
    """What run_all reads of rtk.prune.prepare.Setup: the candidates and the scorer of each criterion."""

    def __init__(self, cands, scorer):
        self.cands, self.scorers = cands, {"ppl": scorer}

    def scorer(self, name):
        return self.scorers[name]


# ---------------------------------------------------------------- variant expansion, targets

def test_variant_expansion():
    vs = select_variants(None)
    assert [v.name for v in vs] == RUN_ORDER and len(vs) == 10
    grid = {(v.normalize, v.method) for v in vs if v.candidates == "sublayers" and v.rank == "ppl"}
    assert grid == {(n, m) for n in ("params", "none", "cost") for m in ("progressive", "one-shot")}
    blocks = {v.name: (v.method, v.rank, v.normalize) for v in vs if v.candidates == "blocks"}
    assert blocks == {"blocks-ppl": ("progressive", "ppl", "none"), "blocks-bi": ("one-shot", "bi", "none"),
                      "blocks-kl": ("progressive", "kl", "none")}
    kl = {v.name: (v.candidates, v.method, v.normalize) for v in vs if v.rank == "kl"}
    assert kl == {"blocks-kl": ("blocks", "progressive", "none"),
                  "params-progressive-kl": ("sublayers", "progressive", "params")}
    assert [v.name for v in select_variants("params-progressive, blocks-bi")] == ["blocks-bi", "params-progressive"]
    with pytest.raises(ValueError, match="rank 'nope' is not a criterion"):  # variants name criteria of the table
        Variant("x", "blocks", "one-shot", "none", "nope", "x")
    with pytest.raises(RtkError, match=r"--variants: unknown variant\(s\) nope; known: params-progressive"):
        select_variants("params-progressive,nope")
    assert parse_targets("0.3,0.1,0.2,0.1") == [0.1, 0.2, 0.3]
    for bad in ("0.2,x", "1.5", ""):
        with pytest.raises(RtkError, match="--targets"):
            parse_targets(bad)


# ---------------------------------------------------------------- shared work and nesting

def test_shared_work_gives_same_orders_with_fewer_evaluations():
    cands, total = make_cands()
    targets = [0.1, 0.2, 0.3]
    shared_inner = Scripted()
    shared = CachedScorer(shared_inner)
    states = run_all(PPL_VARIANTS, Shared(cands, shared), total, targets)

    # each variant alone, with its own uncached scorer, decides exactly the same
    separate_asked = 0
    for v in PPL_VARIANTS:
        alone = Scripted()
        st = run_search(alone, cands[v.candidates], StopRule(total, params_removed=0.3), v.method, v.normalize)
        assert [e["name"] for e in st["removed"]] == [e["name"] for e in states[v.name]["removed"]], v.name
        separate_asked += len(alone.asked)

    asked = shared_inner.asked
    assert len(asked) == len(set(asked)), "a removed set was measured twice"
    singles = [s for s in asked if len(s) == 1]
    # the dense model's step-0 scores: one batched call covering every sublayer candidate, once
    assert sorted(singles, key=sorted) == sorted((frozenset(c.parts) for c in cands["sublayers"]), key=sorted)
    assert asked.count(frozenset()) == 1
    assert len(asked) == shared.misses and shared.hits > 0
    assert len(asked) < separate_asked
    # RI is shared across normalizations at step 0; only the division differs
    s0 = {v.name: states[v.name]["steps"][0]["scores"] for v in PPL_VARIANTS if v.candidates == "sublayers"}
    by_name = {c.name: c for c in cands["sublayers"]}
    for n, s in s0["params-progressive"].items():
        assert s0["none-oneshot"][n]["ri"] == s["ri"] == s0["cost-progressive"][n]["ri"]
        assert s["nri"] == pytest.approx(s["ri"] / by_name[n].params)
        assert s0["cost-oneshot"][n]["nri"] == pytest.approx(s["ri"] / by_name[n].cost)


@pytest.mark.parametrize("name", [v.name for v in PPL_VARIANTS])
def test_nested_prefixes_equal_separate_runs(name):
    v = next(x for x in VARIANTS if x.name == name)
    cands, total = make_cands()
    big = run_search(Scripted(), cands[v.candidates], StopRule(total, params_removed=0.45), v.method, v.normalize)
    seen_lengths = set()
    for t in (0.05, 0.1, 0.2, 0.3, 0.45):
        alone = run_search(Scripted(), cands[v.candidates], StopRule(total, params_removed=t), v.method, v.normalize)
        pre = prefix_for(big["removed"], t, total)
        assert [e["name"] for e in pre] == [e["name"] for e in alone["removed"]]
        assert pre[-1]["ppl_after"] == alone["ppl_current"]
        seen_lengths.add(len(pre))
    assert len(seen_lengths) >= 3  # the targets really cut at different places
    with pytest.raises(RtkError, match="short of 90%"):
        prefix_for(big["removed"], 0.9, total)


def test_unfinished_search_reports_only_reached_targets():
    from rtk.ablate.variants import plans

    cands, total = make_cands()
    v = next(x for x in VARIANTS if x.name == "params-progressive")
    full = run_search(Scripted(), cands["sublayers"], StopRule(total, params_removed=0.3), v.method, v.normalize)
    cut = next(k for k in range(len(full["removed"]))
               if sum(e["params"] for e in full["removed"][: k + 1]) >= 0.1 * total)
    unfinished = {**full, "removed": full["removed"][: cut + 1], "done": False}
    rows = plans({v.name: unfinished}, [v], [0.1, 0.2, 0.3], total)
    assert [r["target"] for r in rows] == [0.1] and rows[0]["search_finished"] is False
    expected = plans({v.name: full}, [v], [0.1], total)  # the same prefix as the finished search's
    expected[0]["search_finished"] = False
    assert rows == expected


def test_ranked_removal_follows_ranking_and_measures_each_prefix():
    cands, total = make_cands()
    ranking = {c.name: float((c.layer * 7) % 5) for c in cands["blocks"]}  # ties broken by model order
    sc = Scripted()
    st = ranked_removal(ranking, cands["blocks"], StopRule(total, params_removed=0.25), sc, 10.0)
    names = [e["name"] for e in st["removed"]]
    expected = sorted((c.name for c in cands["blocks"]), key=lambda n: (ranking[n], int(n.split(".")[1])))
    assert names == expected[: len(names)] and len(names) == 3  # 3 x 40 params >= 25% of 400
    gone = frozenset()
    for e in st["removed"]:
        gone |= {f"attn.{e['layer']}", f"mlp.{e['layer']}"}
        assert e["ppl_after"] == sc._ppl(gone)


# ---------------------------------------------------------------- block influence, by hand

def test_block_influence_matches_hand_computed_cosines():
    hf = tiny_hf("llama", layers=3, seed=3)
    model = tiny_rtk("llama", layers=3, seed=3)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    captured = {}

    def hook(i):
        def fn(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            captured[i] = (h_in.detach(), h_out.detach())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    layers = {f"layer.{i}": [Candidate(f"layer.{i}", i, "layer", 1)] for i in range(3)}
    got = piece_influence(model, ids, layers, batch_size=2)
    assert set(got) == {"layer.0", "layer.1", "layer.2"}
    for i, (a, b) in captured.items():
        a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
        cos = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b)]
        assert got[f"layer.{i}"] == pytest.approx(1 - sum(cos) / len(cos), abs=1e-5)
    assert len(set(round(v, 6) for v in got.values())) == 3


# ---------------------------------------------------------------- cost model arithmetic

def _small_config(**kw):
    return RtkDeciConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, intermediate_size=16, tie_word_embeddings=True, **kw)


HW = Hardware(name="toy", bandwidth=100.0, peak_flops=1000.0, bytes_per_el=2)


def test_cost_model_against_hand_counts():
    cfg = _small_config()
    # params: attn q 8*8 + k 8*4 + v 8*4 + o 8*8 + norm 8 = 200; mlp 3*8*16 + norm 8 = 392
    from rtk.prune.scoring import candidates

    model = RtkDeciLMForCausalLM(cfg)
    cs = {c.name: c.params for c in candidates(model)}
    assert cs["attn.1"] == 200 and cs["mlp.1"] == 392
    B, C = 2, 10
    attn = sublayer_kernels(cfg, "attn", 1, B, C, "decode", HW)
    # projections: 200*2 bytes, 2*B*200 flops; core: KV 2*B*C*K*d*2 = 320 bytes, 4*B*H*d*C = 640 flops
    assert [(k.bytes, k.flops) for k in attn] == [(400, 800), (320, 640)]
    assert [(k.bytes, k.flops) for k in sublayer_kernels(cfg, "mlp", 1, B, C, "decode", HW)] == [(784, 1568)]
    # seconds: attn max(4, .8) + max(3.2, .64) = 7.2; mlp max(7.84, 1.568) = 7.84 (reported in us)
    assert sublayer_cost(cfg, "attn.1", B, C, "decode", HW) == pytest.approx(7.2e6)
    assert sublayer_cost(cfg, "mlp.0", B, C, "decode", HW) == pytest.approx(7.84e6)
    assert sublayer_cost(cfg, "layer.0", B, C, "decode", HW) == pytest.approx(15.04e6)
    fn = sublayer_cost_fn(cfg, CostConfig(batch=B, context=C), HW)
    assert fn(Candidate("attn.1", 1, "attn", 200)) == pytest.approx(7.2e6)

    dense = model_cost(cfg, B, C, "decode", (), HW)
    # head: 100*8*2 = 1600 bytes, 2*B*800 = 3200 flops -> 16 s
    assert dense["bytes"] == 2 * (400 + 320 + 784) + 1600 == 4608
    assert dense["flops"] == 2 * (800 + 640 + 1568) + 3200 == 9216
    assert dense["kv_cache_bytes"] == 640
    assert dense["seconds"] == pytest.approx(2 * (7.2 + 7.84) + 16)
    sp = ideal_speedup(cfg, ["attn.1"], B, C, "decode", HW)
    assert sp["speedup"] == pytest.approx(46.08 / 38.88) and sp["kv_cache_ratio"] == 0.5
    # the same numbers from the physically pruned config
    assert model_cost(pruned_config(cfg, ["attn.1"]), B, C, "decode", (), HW) == sp["after"]

    # prefill of B prompts of C tokens: proj 2*B*C*200 = 8000 flops (8 s); causal core
    # 4*B*H*d*C(C+1)/2 = 3520 flops (3.52 s); mlp 2*B*C*392 = 15680 (15.68 s); head on the last token 16 s
    pre = model_cost(cfg, B, C, "prefill", (), HW)
    assert pre["flops"] == 2 * (8000 + 3520 + 15680) + 3200
    assert pre["seconds"] == pytest.approx(2 * (8 + 3.52 + 15.68) + 16)


def test_cost_counts_biases_and_gqa_like_the_model():
    from rtk.prune.scoring import candidates

    cfg = _small_config(attention_bias=True, qkv_bias=True, mlp_bias=True)
    model = RtkDeciLMForCausalLM(cfg)
    for c in candidates(model):
        kern = sublayer_kernels(cfg, c.kind, c.layer, 1, 1, "decode", HW)
        assert kern[0].bytes == 2 * c.params, c.name


# ---------------------------------------------------------------- end to end on a tiny model

def _recipe(tmp_path, model) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"""model: {model}
data:
  calibration: {{source: wikitext2, split: valid, samples: 2, seq_len: 32}}
  evaluation: {{source: wikitext2, split: test, samples: 2, seq_len: 32}}
search: {{protect: ["attn.0"]}}
cost: {{batch: 4, context: 256}}
""")
    return p


def test_cli_ablate_tiny_model_resumes_and_reports(tmp_path, tiny_folder, monkeypatch):
    from rtk.records import ablation as ablate_report
    from rtk.cli import main

    rec, out = _recipe(tmp_path, tiny_folder), tmp_path / "abl"
    args = ["ablate", str(rec), "-o", str(out), "--targets", "0.01,0.03",
            "--variants", "params-progressive,params-oneshot,blocks-bi", "--quiet"]
    real = ablate_report.write_outputs
    calls = {"n": 0}

    def interrupt_once(res, d):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(res, d)

    monkeypatch.setattr(ablate_report, "write_outputs", interrupt_once)
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, RuntimeError) and not out.exists(), r.output
    assert (tmp_path / "abl.partial" / "state" / "search-params-oneshot.json").is_file()
    r = CliRunner().invoke(main, args + ["--report-only"])
    assert r.exit_code == 0, r.output
    so_far = json.loads((tmp_path / "abl.partial" / "ablation.json").read_text())
    assert so_far["variants"].keys() == {"params-oneshot", "blocks-bi"} and not out.exists()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    res = json.loads((out / "ablation.json").read_text())
    assert res["variants"].keys() == {"params-oneshot", "blocks-bi", "params-progressive"}
    assert len(res["rows"]) == 6
    for row in res["rows"]:
        assert row["params_removed_fraction"] >= row["target"]
        assert (out / row["model_dir"] / "config.json").is_file()
        assert row["attn_removed"] or row["mlp_removed"]
    # progressive's first removal is one-shot's first removal (same step-0 scores)
    assert res["variants"]["params-progressive"]["order"][0] == res["variants"]["params-oneshot"]["order"][0]
    md = (out / "ablation.md").read_text()
    assert "| params-progressive | 1% |" in md and "lowest eval PPL" in md
    assert (out / "ppl_vs_params.png").stat().st_size > 0
    # the exported model loads and gives the evaluated PPL
    from rtk.data import token_blocks
    from rtk.model.load import load_model
    from rtk.prune.config import load_recipe
    from rtk.prune.scoring import ModelScorer

    row = res["rows"][-1]
    m, tok, _ = load_model(str(out / row["model_dir"]))
    blocks, _ = token_blocks(tok, load_recipe(rec).data.evaluation, "e")
    assert ModelScorer(m, blocks, progress=False).ppl() == pytest.approx(row["eval_ppl"], rel=1e-5)
    # its plan.json names what it lacks (rtk.plan's schema), so it re-exports like an rtk prune output: before
    # the schema, ablate wrote only `removed` and `rtk export` refused the folder
    plan = json.loads((out / row["model_dir"] / "plan.json").read_text())
    assert sorted(plan["removed_sublayers"]) == sorted([f"attn.{i}" for i in row["attn_removed"]]
                                                       + [f"mlp.{i}" for i in row["mlp_removed"]])
    r = CliRunner().invoke(main, ["export", str(out / row["model_dir"]), "-o", str(tmp_path / "re-exported")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "re-exported" / "plan.json").read_text())["removed_sublayers"] == \
        plan["removed_sublayers"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already holds this ablation" in r.output
    r = CliRunner().invoke(main, ["ablate", str(rec), "-o", str(out), "--targets", "0.5"])
    assert r.exit_code == 1 and "holds an ablation of a different recipe or targets" in r.output


def test_kl_variants_search_by_kl_and_report_calibration_ppl(tmp_path, tiny_folder):
    """blocks-kl and params-progressive-kl remove what a search scored by KL to the original model removes
    (rtk.prune.select's criterion), and their rows, like every variant's, carry calibration PPL."""
    from rtk.cli import main
    from rtk.data import token_blocks
    from rtk.model.load import load_model
    from rtk.model.ppl import teacher_logprobs
    from rtk.prune.config import load_recipe
    from rtk.model.layers import InMemory
    from rtk.prune.scoring import Loaded, candidates, scorer_for

    rec, out = _recipe(tmp_path, tiny_folder), tmp_path / "abl"
    r = CliRunner().invoke(main, ["ablate", str(rec), "-o", str(out), "--targets", "0.02",
                                  "--variants", "blocks-kl,params-progressive-kl,params-progressive", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "ablation.json").read_text())
    assert res["scoring_kl"]["kl_evaluations"] > 0
    assert f"KL variants: {res['scoring_kl']['kl_evaluations']} KL evaluations" in (out / "ablation.md").read_text()
    recipe = load_recipe(rec)
    model, tok, _ = load_model(str(tiny_folder))
    calib, _ = token_blocks(tok, recipe.data.calibration, "c")
    ref = teacher_logprobs(model, calib, recipe.scoring.batch_size)
    loaded = Loaded(model, tok, "", InMemory(model), "none")
    kl = scorer_for(recipe, loaded, calib, False, teacher_logprobs=ref)
    ppl = scorer_for(recipe, loaded, calib, False)
    total = res["params_counted"]["total"]
    for name, kind, normalize in (("blocks-kl", "blocks", "none"), ("params-progressive-kl", "sublayers", "params")):
        cs = candidates(model, kind, ["attn.0"])
        want = run_search(kl, cs, StopRule(total, params_removed=0.02), "progressive", normalize)
        assert res["variants"][name]["order"] == [e["name"] for e in want["removed"]], name
        (row,) = [x for x in res["rows"] if x["variant"] == name]
        gone = frozenset(p for e in want["removed"] for c in cs if c.name == e["name"] for p in c.parts)
        assert row["calib_ppl"] == pytest.approx(ppl.ppl(gone), rel=1e-5)
        assert row["calib_ppl_base"] == pytest.approx(ppl.ppl(frozenset()), rel=1e-5)
    # the criteria differ on this model, so the order above could not have come from the PPL search
    assert res["variants"]["params-progressive"]["order"] != res["variants"]["params-progressive-kl"]["order"]


def test_ablate_targets_count_non_embedding_parameters_where_the_recipe_says(tmp_path, tiny_folder):
    """The tiny model is mostly embedding: 20% of all its parameters is out of reach (one line naming the count),
    20% of its non-embedding ones is a row whose fraction is of those, and the report says so."""
    from rtk.cli import main

    rec = _recipe(tmp_path, tiny_folder)
    args = ["--targets", "0.2", "--variants", "params-oneshot", "--quiet"]
    r = CliRunner().invoke(main, ["ablate", str(rec), "-o", str(tmp_path / "all"), *args])
    assert r.exit_code == 1 and "search.target.count: non_embedding" in r.output and not (tmp_path / "all").exists()
    rec.write_text(rec.read_text().replace('search: {protect: ["attn.0"]}', 'search: {protect: ["attn.0"], '
                                           'target: {params_removed: 0.2, count: non_embedding}}'))
    r = CliRunner().invoke(main, ["ablate", str(rec), "-o", str(tmp_path / "ne"), *args])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ne" / "ablation.json").read_text())
    counted = res["params_counted"]
    assert counted == {"count": "non_embedding", "total": res["params_total"] - 49152 * 64}
    (row,) = res["rows"]
    assert row["params_removed_fraction"] == row["params_removed"] / counted["total"] >= 0.2
    assert f"20% of the {counted['total']:,} non-embedding ones" in (tmp_path / "ne" / "ablation.md").read_text()


def test_shipped_ablation_recipe_is_valid():
    from rtk.prune.config import load_recipe

    r = load_recipe(REPO / "recipes" / "smollm2-ablation.yaml")
    assert r.data.calibration.split != r.data.evaluation.split and r.cost.batch == 16


def test_cost_variants_normalize_by_the_recipes_measured_profile(tmp_path, tiny_folder):
    """ablate's cost-* variants share rtk prune's setup: with a cost.profile, the cost-oneshot plan is the one-shot
    ranking by RI / the profile's share of the step time (not the roofline's cost), and here that changes it."""
    from rtk.cli import main
    from rtk.model.load import load_model
    from rtk.model.speed import SpeedProfile, shape_id

    model, _, _ = load_model(str(tiny_folder))
    share = {"attn": 0.2, "mlp": 1e-4}  # the roofline's attention costs ~3x an MLP here; this profile, 2000x
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(SpeedProfile("e", "m", "w", "tok/s", shape_id(model.config), share).to_json()))
    rec = _recipe(tmp_path, tiny_folder)
    args = ["--targets", "0.005", "--variants", "cost-oneshot", "--quiet"]
    assert CliRunner().invoke(main, ["ablate", str(rec), "-o", str(tmp_path / "roof"), *args]).exit_code == 0
    rec.write_text(rec.read_text().replace("cost: {batch: 4, context: 256}",
                                           f"cost: {{batch: 4, context: 256, profile: {prof}}}"))
    r = CliRunner().invoke(main, ["ablate", str(rec), "-o", str(tmp_path / "prof"), *args])
    assert r.exit_code == 0, r.output
    res = {d: json.loads((tmp_path / d / "ablation.json").read_text()) for d in ("roof", "prof")}
    assert res["prof"]["cost_model"]["normalize_cost"]["model"] == "measured profile"
    assert res["roof"]["cost_model"]["normalize_cost"]["model"] == "roofline"
    step0 = json.loads((tmp_path / "prof" / "state" / "search-cost-oneshot.json").read_text())["steps"][0]["scores"]
    ranked = sorted(step0, key=lambda n: step0[n]["ri"] / share[n.split(".")[0]])
    for name, s in step0.items():  # every NRI is RI per the profile's share
        assert s["nri"] == pytest.approx(s["ri"] / share[name.split(".")[0]])
    order = res["prof"]["variants"]["cost-oneshot"]["order"]
    assert order == ranked[: len(order)]
    assert order != res["roof"]["variants"]["cost-oneshot"]["order"]
