"""Selection judged after healing (recipe `select:`): proposals from families x criteria, held-out judge text,
finalists healed briefly, the best after healing kept; block influence of sublayers, layers and spans."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_rtk
from test_prune_cli import _bad, recipe, run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)

from rtk.data import DataSpec, token_blocks, token_spans
from rtk.prune.scoring.influence import piece_influence
from rtk.prune.search import Candidate, StopRule
from rtk.prune.select import _order, span_plans


# ---------------------------------------------------------------- held-out text

def test_blocks_avoid_held_out_spans_and_are_unchanged_without(smollm2_dir):
    from rtk.model.load import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    spec = DataSpec(source="wikitext2", split="valid", samples=8, seq_len=64)
    blocks, _ = token_blocks(tok, spec, "x")
    ids = tok(open(token_blocks(tok, spec, "x")[1]["file"]).read(), add_special_tokens=False,
              return_tensors="pt")["input_ids"][0]
    n = ids.numel() // 64  # what rtk has always cut: evenly spaced whole blocks
    old = [ids[s: s + 64] for s in (torch.linspace(0, n - 1, 8).round().long() * 64).tolist()]
    assert torch.equal(blocks, torch.stack(old))
    taken = token_spans(tok, spec, "x")
    judge = DataSpec(source="wikitext2", split="valid", samples=20, seq_len=100)
    spans = token_spans(tok, judge, "j", taken)
    assert len(spans) == 20
    assert not any(a < d and c < b for a, b in spans for c, d in taken)
    jb, info = token_blocks(tok, judge, "j", taken)
    assert info["held_out_blocks"] == 8
    assert torch.equal(jb, torch.stack([ids[a:b] for a, b in spans]))
    from rtk.errors import RtkError
    with pytest.raises(RtkError, match="outside the 8 block"):
        token_blocks(tok, DataSpec(source="wikitext2", split="valid", samples=n - 4, seq_len=64), "j", taken)


# ---------------------------------------------------------------- block influence, generalized

def _cos_dist(a, b):
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def test_influence_of_sublayers_layers_and_spans_by_hand():
    model = tiny_rtk("llama", layers=4, seed=5)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    m = model.model
    cos, sin = m.rotary(torch.arange(10)[None], torch.float32)
    with torch.no_grad():
        hs, h = [m.embed_tokens(ids)], m.embed_tokens(ids)
        for layer in m.layers:  # the residual stream by hand: h + attn(norm h), then + mlp(norm h)
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, None)
            hs.append(h)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            hs.append(h)
    c = {n: Candidate(n, int(n.split(".")[1]), n.split(".")[0], 1)
         for n in ("attn.1", "mlp.1", "mlp.2", "attn.3", "layer.1", "layer.2", "layer.3")}
    pieces = {"attn.1": [c["attn.1"]], "mlp.2": [c["mlp.2"]], "layer.3": [c["layer.3"]],
              "span.1-2": [c["layer.1"], c["layer.2"]], "mlp.1-attn.3": [c["mlp.1"], c["attn.3"]]}
    got = piece_influence(model, ids, pieces, batch_size=2)
    assert got["attn.1"] == pytest.approx(_cos_dist(hs[2], hs[3]), abs=1e-5)
    assert got["mlp.2"] == pytest.approx(_cos_dist(hs[5], hs[6]), abs=1e-5)
    assert got["layer.3"] == pytest.approx(_cos_dist(hs[6], hs[8]), abs=1e-5)
    assert got["span.1-2"] == pytest.approx(_cos_dist(hs[2], hs[6]), abs=1e-5)
    assert got["mlp.1-attn.3"] == pytest.approx(_cos_dist(hs[3], hs[7]), abs=1e-5)
    alone = piece_influence(model, ids, {"layer.2": [c["layer.2"]]})
    assert piece_influence(model, ids, {"span.2-2": [c["layer.2"]]})["span.2-2"] == pytest.approx(alone["layer.2"])


# ---------------------------------------------------------------- the criteria table

def test_the_recipe_names_the_criteria_of_the_table():
    """search.criterion and select.criteria accept the table's entries (searched ones for a search) and nothing
    else; what the config refuses for a criterion comes from its entry."""
    from typing import get_args

    from rtk.errors import RtkError
    from rtk.prune.config import SearchConfig, SelectConfig, parse_recipe
    from rtk.prune.criteria import CRITERIA, SEARCHED

    assert set(get_args(SelectConfig.model_fields["criteria"].annotation.__args__[0])) == set(CRITERIA)
    assert get_args(SearchConfig.model_fields["criterion"].annotation) == SEARCHED == ("ppl", "kl")
    base = {"model": "m", "search": {"criterion": "kl", "target": {"ppl_increase": 0.5}}}
    with pytest.raises(RtkError, match="criterion: kl: a ppl_increase / ppl_max target is in calibration PPL"):
        parse_recipe(base)
    with pytest.raises(RtkError, match="search.criterion"):
        parse_recipe({"model": "m", "search": {"criterion": "bi"}})  # ranked once: no search of its own
    parse_recipe({"model": "m", "scoring": {"workers": 2}, "search": {"criterion": "ppl"}})
    with pytest.raises(RtkError, match="search.criterion: kl is not supported with scoring.workers > 1"):
        parse_recipe({"model": "m", "scoring": {"workers": 2}, "search": {"criterion": "kl"}})


# ---------------------------------------------------------------- spans and finalist order

def _blocks(n=6, params=10):
    return [Candidate(f"layer.{i}", i, "layer", params) for i in range(n)]


def test_span_plans_are_the_shortest_runs_that_reach_the_target():
    cands = [c for c in _blocks() if c.layer != 2]  # layer 2 protected: no span crosses it
    got = span_plans(cands, StopRule(params_total=100, params_removed=0.2))
    assert got == {"span.0-1": cands[0:2], "span.3-4": cands[2:4], "span.4-5": cands[3:5]}
    speed = StopRule(params_total=100, speedup=1.3, speed=lambda gone: 1 + 0.1 * len(set(gone)) / 2)
    assert set(span_plans(_blocks(), speed)) == {"span.0-2", "span.1-3", "span.2-4", "span.3-5"}
    from rtk.errors import RtkError
    with pytest.raises(RtkError, match="spans: no run of consecutive layers"):
        span_plans(cands, StopRule(params_total=100, params_removed=0.35))


def test_finalists_take_each_familys_best_first():
    ps = [{"name": n, "family": n.split("-")[0], "judge_ppl_before": v} for n, v in
          [("sublayers-ppl", 10.0), ("sublayers-bi", 11.0), ("blocks-ppl", 30.0), ("blocks-bi", 20.0),
           ("spans-ppl", 15.0)]]
    assert [p["name"] for p in _order(ps)] == ["sublayers-ppl", "spans-ppl", "blocks-bi", "sublayers-bi",
                                               "blocks-ppl"]


# ---------------------------------------------------------------- rtk prune with select:

SELECT = {"families": ["sublayers", "blocks", "spans"], "criteria": ["ppl", "kl", "bi"], "finalists": 2,
          "heal": {"tokens": 256, "micro_batch": 2, "data": {"source": "wikitext2", "split": "valid", "seq_len": 32}},
          "judge": {"source": "wikitext2", "split": "valid", "samples": 3, "seq_len": 32}}


def _select_recipe(tmp_path, tiny_dir, **over):  # noqa: F811
    return recipe(tmp_path, tiny_dir, search__target={"params_removed": 0.015}, select=SELECT, **over)


@pytest.mark.heal
def test_select_heals_finalists_on_held_out_text_and_keeps_the_best(tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import rtk.heal.run as heal_run
    from rtk.model.load import load_tokenizer

    seen, real, stop_at = [], heal_run.heal_model, [2]

    def spy(student, teacher, tokenizer, cfg, evalb, eval_info, *a, pool=None, **kw):
        seen.append((evalb.clone(), pool[0].clone()))  # what each finalist is healed on and judged on
        if len(seen) == stop_at[0]:
            raise KeyboardInterrupt  # stopped while healing the second finalist
        return real(student, teacher, tokenizer, cfg, evalb, eval_info, *a, pool=pool, **kw)

    monkeypatch.setattr(heal_run, "heal_model", spy)
    r, out = _select_recipe(tmp_path, tiny_dir), tmp_path / "out"
    res = run("prune", r, "-o", out, "--quiet")
    assert res.exit_code != 0 and not out.exists()
    state = json.loads((tmp_path / "out.partial" / "select" / "state.json").read_text())
    assert len(state["proposals"]) == 9 and len(state["healed"]) == 1
    stop_at[0] = 0
    res = run("prune", r, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert len(seen) == 3  # the rerun healed only the finalist left

    plan = json.loads((out / "plan.json").read_text())
    sel = plan["selection"]
    props = {p["name"]: p for p in sel["proposals"]}
    assert set(props) == {f"{f}-{c}" for f in ("sublayers", "blocks", "spans") for c in ("ppl", "kl", "bi")}
    for p in props.values():
        assert p["params_removed_fraction"] >= 0.015 and p["predicted_speedup"] > 1
        assert p["judge_ppl_before"] > 0 and p["calibration_ppl"] > 0
    fins = [p for p in props.values() if p.get("finalist")]
    assert sorted(p["finalist"] for p in fins) == [1, 2]
    assert len({p["family"] for p in fins}) == 2  # the best of two families, not two plans of one
    win = min(fins, key=lambda p: p["judge_ppl_after"])
    assert sel["winner"] == win["name"] and plan["removed_sublayers"] == win["removed_sublayers"]
    assert plan["ppl_final"] == pytest.approx(win["calibration_ppl"])
    for p in props.values():  # every plan reaches the target; spans are one run of layers
        if p["family"] == "spans":
            layers = sorted({int(n.split(".")[1]) for n in p["removed_sublayers"]})
            assert layers == list(range(layers[0], layers[-1] + 1)) and len(p["removed_sublayers"]) == 2 * len(layers)
    report = (out / "report.md").read_text()
    assert "## Selection: plans judged after healing" in report and f"Winner: **{win['name']}**" in report
    assert "![judge PPL of every plan](selection.png)" in report and (out / "selection.png").is_file()

    # finalists never see the evaluation text: the judge blocks and the healing blocks are cut from the
    # calibration split (valid), the judge's avoid the calibration blocks, the healing's avoid the judge's
    tok = load_tokenizer(str(tiny_dir))
    valid = tok(open(token_blocks(tok, DataSpec(source="wikitext2", split="valid", samples=1, seq_len=32), "v")[1]
                     ["file"]).read(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    grid = {tuple(valid[k: k + 32].tolist()) for k in range(0, valid.numel() - 31, 32)}
    calib, _ = token_blocks(tok, DataSpec(source="wikitext2", split="valid", samples=3, seq_len=32), "c")
    evalb, _ = token_blocks(tok, DataSpec(source="wikitext2", split="test", samples=3, seq_len=48), "e")
    rows = lambda b: {tuple(r.tolist()) for r in b}  # noqa: E731
    for judge, pool in seen:
        assert rows(judge) <= grid and rows(pool) <= grid
        assert not rows(judge) & rows(calib) and not rows(judge) & rows(pool)
        assert not {r[:32] for r in rows(evalb)} & (rows(judge) | rows(pool))
    assert torch.equal(seen[0][0], seen[-1][0])  # every finalist judged on the same blocks


def test_select_bad_inputs_one_clear_line(tmp_path, tiny_dir):  # noqa: F811
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.015}, select={**SELECT, "finalists": 0})
    assert msg.endswith("select.finalists: 0 finalists leave no plan to choose; give 1 or more")
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.015},
               select={**SELECT, "judge": {"source": "wikitext2", "split": "test"}})
    assert "select.judge and data.evaluation use the same text (wikitext2 [test])" in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.015},
               select={**SELECT, "heal": {"data": {"source": "wikitext2", "split": "test"}}})
    assert "select.heal.data and data.evaluation use the same text (wikitext2 [test])" in msg
    msg = _bad(tmp_path, tiny_dir, select=SELECT)  # the test recipe's target: sublayers: 3
    assert "select: needs search.target params_removed or speedup" in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.015}, select={**SELECT, "criteria": ["ppx"]})
    assert "select.criteria.0: Input should be 'ppl', 'kl' or 'bi'" in msg
    for m in (msg,):
        assert "\n" not in m
