"""Selection judged after healing (recipe `select:`): proposals from families x criteria, held-out judge text or
the user's lm-eval tasks, finalists healed briefly, the best after healing kept unless its lead is inside the paired
interval (then the fastest tied finalist); block influence of sublayers, layers and spans."""
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
    # the finalist judged is saved in state.json, and its healing checkpoint (the model's size) is removed
    assert not list((tmp_path / "out.partial" / "select").glob("heal-*"))
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
    best = min(fins, key=lambda p: p["judge_ppl_after"])
    d = sel["decision"]  # the best wins unless its lead is inside the paired interval: then the fastest tied one
    assert d["best_on_judge"] == best["name"] and set(d["leads"]) == {p["name"] for p in fins} - {best["name"]}
    tied = [props[n] for n in d["tied"]]
    assert d["tie"] == (len(tied) > 1) and all((d["leads"][p["name"]]["verdict"] == "better") == (p not in tied)
                                                for p in fins if p is not best)
    win = max(tied, key=lambda p: p["predicted_speedup"]) if d["tie"] else best
    assert all(len(p["judge_block_nll"]) == 3 for p in fins)
    assert not list((out / "select").glob("heal-*")) and (out / "select" / "state.json").is_file()
    assert sel["winner"] == d["winner"] == win["name"] and plan["removed_sublayers"] == win["removed_sublayers"]
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


# ---------------------------------------------------------------- the judge on the user's task, and ties

def _finalist(name, k, speed, **judged):
    return {"name": name, "finalist": k, "predicted_speedup": speed, **judged}


def _docs(*scores):
    return {"piqa": {"doc_id": list(range(len(scores))), "acc": list(map(float, scores))}}


def test_a_tie_is_decided_by_speed_and_the_report_says_so(tmp_path):
    """Scripted judgements: A is best on the judge, its lead over B is inside the paired interval (a tie) and over
    C outside it; B is faster than A, so B wins, and the record and report name the tie. Without the tie (A far
    ahead of everyone) the best wins, however fast the others are."""
    from rtk.prune.select import decide
    from rtk.records.prune import decision_lines

    n = 60
    a = _finalist("sublayers-ppl", 1, 1.20, judge_score=31 / n, judge_per_doc=_docs(*[1] * 31, *[0] * 29))
    b = _finalist("blocks-kl", 2, 1.30, judge_score=29 / n, judge_per_doc=_docs(*[1] * 29, *[0] * 31))
    c = _finalist("spans-bi", 3, 1.40, judge_score=2 / n, judge_per_doc=_docs(*[1] * 2, *[0] * 58))
    d = decide([a, b, c], metric="acc")
    assert d["best_on_judge"] == "sublayers-ppl" and d["tie"] and d["tied"] == ["sublayers-ppl", "blocks-kl"]
    assert d["winner"] == "blocks-kl"  # the faster of the tied two; spans-bi is faster still, but clearly worse
    assert d["leads"]["blocks-kl"]["verdict"] == "no difference shown" and d["leads"]["spans-bi"]["verdict"] == "better"
    text = "\n".join(decision_lines({"decision": d}))
    assert ("**A tie**: sublayers-ppl is best on the judge, but its lead over blocks-kl is inside the paired 95% "
            "interval (no difference shown); of the tied finalists (sublayers-ppl, blocks-kl) the fastest, "
            "**blocks-kl**, wins.") in text
    assert "| blocks-kl | +0.0333 [" in text and "| no difference shown | yes |" in text

    far = _finalist("blocks-kl", 2, 1.30, judge_score=0.0, judge_per_doc=_docs(*[0] * n))
    d = decide([a, far], metric="acc")
    assert (d["winner"], d["tie"], d["tied"]) == ("sublayers-ppl", False, ["sublayers-ppl"])
    assert "No tie: sublayers-ppl's lead over every other finalist is outside" in "\n".join(decision_lines({"decision": d}))

    # the PPL judge: per-block NLLs, intervals over the blocks
    base = [40.0, 55.0, 38.0, 61.0, 47.0, 52.0]
    p1 = _finalist("sublayers-ppl", 1, 1.1, judge_ppl_after=0, judge_block_nll=base)
    p2 = _finalist("blocks-bi", 2, 1.5, judge_ppl_after=1, judge_block_nll=[x + 0.05 * (-1) ** i for i, x in enumerate(base)])
    p3 = _finalist("spans-ppl", 3, 1.6, judge_ppl_after=2, judge_block_nll=[x + 8 for x in base])
    d = decide([p1, p2, p3], block_tokens=[15] * 6)
    assert d["tied"] == ["sublayers-ppl", "blocks-bi"] and d["winner"] == "blocks-bi"
    assert d["leads"]["spans-ppl"]["verdict"] == "better" and d["leads"]["spans-ppl"]["higher_is_better"] is False


def test_judge_documents_never_report():
    """The judge takes each task's last `limit` documents; whatever may report (`report`, rtk bench --limit: the
    first N) stops before them, and a recipe whose reporting documents reach them is refused."""
    from rtk.bench.accuracy.tasks import TASKS
    from rtk.prune.config import TaskJudge, judge_documents
    from rtk.prune.select import task_judge_record

    for task, spec in TASKS.items():
        for limit in (1, 200, spec.docs // 2):
            judge = set(judge_documents(task, limit))
            assert len(judge) == limit and max(judge) == spec.docs - 1
            rec = task_judge_record(TaskJudge(tasks=[task], limit=limit))["tasks"][task]
            lo, hi = rec["reporting_documents"]
            assert not judge & set(range(lo, hi + 1)) and hi + 1 == spec.docs - limit
            assert rec["judge_documents"] == [spec.docs - limit, spec.docs - 1]
            reported = TaskJudge(tasks=[task], limit=limit, report=spec.docs - limit)  # the most that may report
            assert not judge & set(range(reported.report))
    with pytest.raises(ValueError, match="they overlap"):
        TaskJudge(tasks=["piqa", "winogrande"], limit=200, report=1100)  # fits PIQA (1838), not WinoGrande (1267)


@pytest.mark.parametrize("judge,msg", [
    ({"tasks": ["piqa", "mmlu"], "limit": 20},
     "select.judge.tasks: unknown task 'mmlu'; known: piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande"),
    ({"tasks": ["arc_challenge"], "limit": 2000}, "select.judge.limit: 2000 is more than arc_challenge's 1172 documents"),
    ({"tasks": ["piqa"], "limit": 200, "report": 1700},
     "select.judge.report: the first 1700 documents of piqa report and its last 200 judge: they overlap (1838 "
     "documents); the documents that judge never report"),
])
def test_task_judge_bad_inputs_one_clear_line(tmp_path, tiny_dir, judge, msg):  # noqa: F811
    got = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.015}, select={**SELECT, "judge": judge})
    assert got.endswith(msg) and "\n" not in got


def test_finalists_judged_by_lm_eval_on_the_judge_documents(tmp_path, tiny_dir):  # noqa: F811
    """A healed finalist saved to a folder and run by lm-eval (the path rtk bench runs) on the last documents of
    the task only: lm-eval's per-document results name those documents; the folder is not kept."""
    from types import SimpleNamespace

    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan
    from rtk.prune.config import parse_recipe
    from rtk.prune.select import judge_on_tasks

    model, tok, path = load_model(str(tiny_dir))
    rec = parse_recipe({"model": str(tiny_dir), "select": {"judge": {"tasks": ["piqa"], "limit": 2}},
                        "search": {"target": {"params_removed": 0.015}}})
    setup = SimpleNamespace(recipe=rec.model_copy(update={"device": "cpu", "dtype": "float32"}), tokenizer=tok,
                            loaded=SimpleNamespace(path=path))
    said = []
    got = judge_on_tasks(apply_plan(model, ["mlp.2"]), setup, "blocks-bi", tmp_path, said.append)
    assert got["judge_per_doc"]["piqa"]["doc_id"] == [1836, 1837] and got["judge_tasks"]["piqa"]["n"] == 2
    assert got["judge_score"] == sum(got["judge_per_doc"]["piqa"]["acc"]) / 2
    assert '--samples {"rtk_piqa":[1836,1837]}' in got["judge_command"].replace("'", "")
    assert not (tmp_path / "judge-blocks-bi").exists() and "2 chosen docs" in said[0]
    assert said[0].startswith("rtk: select:   lm_eval (hf)") and (tmp_path.parent / got["judge_results_file"]).is_file()


@pytest.mark.heal
def test_rtk_prune_judged_on_a_task_end_to_end(tmp_path, tiny_dir):  # noqa: F811
    """`rtk prune` with select.judge naming an lm-eval task, as a user runs it: each finalist healed, then scored by
    lm-eval on the task's last documents; plan.json says which documents judged and which may report, every
    finalist keeps its per-document scores, the decision follows the paired rule, the report says it, and rtk
    bench then refuses a --limit that reaches the judge's documents."""
    from rtk.bench.run import check_judged_documents
    from rtk.errors import RtkError
    from rtk.prune.select import decide

    sel = {**SELECT, "families": ["sublayers", "blocks"], "criteria": ["ppl"],
           "judge": {"tasks": ["piqa"], "limit": 4}}
    r, out = recipe(tmp_path, tiny_dir, search__target={"params_removed": 0.015}, select=sel), tmp_path / "out"
    res = run("prune", r, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    s = plan["selection"]
    assert s["judge"]["kind"] == "tasks" and s["judge"]["tasks"]["piqa"] == {
        "judge_documents": [1834, 1837], "of": 1838, "reporting_documents": [0, 1833]}
    fins = sorted((p for p in s["proposals"] if p.get("finalist")), key=lambda p: p["finalist"])
    assert [p["name"] for p in fins] in (["sublayers-ppl", "blocks-ppl"], ["blocks-ppl", "sublayers-ppl"])
    for p in fins:  # scored by lm-eval on the judge documents only; its samples kept in OUT
        docs = p["judge_per_doc"]["piqa"]
        assert docs["doc_id"] == [1834, 1835, 1836, 1837] and p["judge_score"] == sum(docs["acc"]) / 4
        assert (out / p["judge_results_file"]).is_file() and p["judge_tasks"]["piqa"]["n"] == 4
    d = s["decision"]
    assert d == decide(fins, metric="acc") and s["winner"] == d["winner"]
    assert plan["removed_sublayers"] == next(p for p in fins if p["name"] == d["winner"])["removed_sublayers"]
    report = (out / "report.md").read_text()
    assert f"Winner: **{d['winner']}**" in report and "piqa documents 1834-1837 of 1838" in report
    assert ("**A tie**" if d["tie"] else "No tie") in report
    assert not list((out / "select").glob("heal-*")) and not list((out / "select").glob("judge-*"))
    with pytest.raises(RtkError, match="documents that judge never report: --limit 1834 or less"):
        check_judged_documents(out / "model", ["piqa"], 1835)  # the model folder carries its plan.json
    check_judged_documents(out / "model", ["piqa"], 1834)
