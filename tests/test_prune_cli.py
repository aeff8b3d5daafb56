"""`rtk prune` as a user runs it: outputs, resume, and every bad input -> one line, exit != 0."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from rtk.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A random 4-layer Llama with SmolLM2's tokenizer, saved as a standard HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def recipe(tmp_path, model_, **over):
    r = {"model": str(model_), "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 3, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 3, "seq_len": 48}},
         "search": {"method": "progressive", "normalize": "params", "target": {"sublayers": 3},
                    "protect": ["attn.0"]}}
    for k, v in over.items():
        node = r
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    if "model" in over:
        r["model"] = over["model"]
    p = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prune_writes_plan_model_report(tmp_path, tiny_dir):
    out = tmp_path / "out"
    res = run("prune", recipe(tmp_path, tiny_dir), "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "PPL" in res.output and "before ->" in res.output and "rtk: removed 3 sublayers," in res.output
    plan = json.loads((out / "plan.json").read_text())
    for key in ("model", "recipe", "params_total", "params_removed", "ppl_base", "ppl_final", "eval", "removed",
                "steps"):
        assert key in plan
    assert len(plan["removed"]) == 3 and len(plan["steps"]) == 3
    for e in plan["removed"]:
        assert set(e) >= {"layer", "kind", "params", "ri", "nri", "ppl_after"} and e["kind"] in ("attn", "mlp")
    assert plan["eval"]["split"] == "test" and plan["eval"]["tokens"] == 3 * 48
    assert plan["params_removed"] == sum(e["params"] for e in plan["removed"])
    assert plan["ppl_final"] == plan["removed"][-1]["ppl_after"]
    assert set(plan["steps"][0]["scores"]) == {"mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2", "attn.3", "mlp.3"}
    for f in ("report.md", "ri_heatmap.png", "ppl_curve.png", "model/config.json", "model/model.safetensors"):
        assert (out / f).is_file(), f
    assert not (tmp_path / "out.partial").exists()
    assert "target sublayers: 3, protect attn.0\n" in (out / "report.md").read_text()  # no None entries
    # the written model is the pruned one: its PPL on the evaluation blocks is the reported one
    from rtk.data import token_blocks
    from rtk.model.load import load_model
    from rtk.data import DataSpec
    from rtk.prune.scoring import ModelScorer

    model, tok, _ = load_model(str(out / "model"))
    blocks, _ = token_blocks(tok, DataSpec(source="wikitext2", split="test", samples=3, seq_len=48), "eval")
    assert ModelScorer(model, blocks, batch_size=2, progress=False).ppl() == pytest.approx(plan["eval"]["ppl_final"], rel=1e-4)
    # rerunning a finished recipe into the same folder does nothing
    res = run("prune", recipe(tmp_path, tiny_dir), "-o", out, "--quiet")
    assert res.exit_code == 0 and "already holds this recipe's result" in res.output


def test_whole_layer_plans_say_layers(tmp_path, tiny_dir):
    """A plan of whole layers says how many layers it removed, not 'sublayers'."""
    res = run("prune", recipe(tmp_path, tiny_dir, search__candidates="blocks", search__target={"sublayers": 2}),
              "-o", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    assert "rtk: removed 2 layers," in res.output


def test_kl_criterion_removes_what_a_kl_search_removes(tmp_path, tiny_dir):
    """search.criterion: kl ranks by KL to the original model (the select: criterion, as a plain recipe): the plan
    is run_search's over a KL scorer, its ppl_after values stay calibration PPL (exp(mean KL) beside them), the
    report names the criterion, and criterion: ppl written out keeps an old recipe's fingerprint."""
    from rtk.data import token_blocks
    from rtk.model.load import load_model
    from rtk.model.ppl import teacher_logprobs
    from rtk.prune.config import load_recipe
    from rtk.model.layers import InMemory
    from rtk.prune.scoring import Loaded, candidates, scorer_for
    from rtk.prune.search import StopRule, run_search

    out = tmp_path / "out"
    rec = recipe(tmp_path, tiny_dir, search__criterion="kl")
    res = run("prune", rec, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    r = load_recipe(rec)
    model, tok, _ = load_model(str(tiny_dir))
    calib, _ = token_blocks(tok, r.data.calibration, "c")
    loaded = Loaded(model, tok, "", InMemory(model), "none")
    kl = scorer_for(r, loaded, calib, False, teacher_logprobs=teacher_logprobs(model, calib, 2))
    ppl = scorer_for(r, loaded, calib, False)
    cands = candidates(model, "sublayers", ["attn.0"])
    want = run_search(kl, cands, StopRule(plan["params_total"], sublayers=3), "progressive", "params")
    assert [e["name"] for e in plan["removed"]] == [e["name"] for e in want["removed"]]
    gone = frozenset()
    for got, w in zip(plan["removed"], want["removed"]):
        gone = gone | {got["name"]}
        assert got["ppl_after"] == pytest.approx(ppl.ppl(gone), rel=1e-5)
        assert got["kl_exp_after"] == pytest.approx(w["ppl_after"], rel=1e-5)
    assert plan["ppl_base"] == pytest.approx(ppl.ppl(frozenset()), rel=1e-5)
    # the criterion decides: PPL ranks this model's sublayers otherwise
    by_ppl = run_search(ppl, cands, StopRule(plan["params_total"], sublayers=3), "progressive", "params")
    assert [e["name"] for e in by_ppl["removed"]] != [e["name"] for e in plan["removed"]]
    assert "criterion kl" in (out / "report.md").read_text()
    assert load_recipe(recipe(tmp_path, tiny_dir, search__criterion="ppl")).fingerprint() == \
        load_recipe(recipe(tmp_path, tiny_dir)).fingerprint() != r.fingerprint()
    bad = run("prune", recipe(tmp_path, tiny_dir, search__criterion="kl", search__target={"ppl_max": 40}),
              "-o", tmp_path / "bad", "--quiet")
    assert bad.exit_code == 1 and "criterion: kl" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


@pytest.mark.parametrize("method", ["progressive", "one-shot"])
def test_resume_yields_the_same_plan(tmp_path, tiny_dir, method):
    r = recipe(tmp_path, tiny_dir, search__method=method)
    full, part = tmp_path / "full", tmp_path / "part"
    assert run("prune", r, "-o", full, "--quiet").exit_code == 0
    res = run("prune", r, "-o", part, "--quiet", "--max-steps", "1")
    assert res.exit_code == 0 and "paused after 1 step" in res.output
    assert not part.exists() and (tmp_path / "part.partial" / "search_state.json").is_file()
    res = run("prune", r, "-o", part, "--quiet")
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output
    a, b = (json.loads((d / "plan.json").read_text()) for d in (full, part))
    assert a["removed"] == b["removed"] and a["steps"] == b["steps"]
    # a different recipe into a used folder is refused
    other = recipe(tmp_path, tiny_dir, search__target={"sublayers": 2})
    res = run("prune", other, "-o", part, "--quiet")
    assert res.exit_code == 1 and "holds a run of a different recipe" in res.output


def _bad(tmp_path, tiny_dir, **over):
    out = tmp_path / "bad-out"
    res = run("prune", recipe(tmp_path, tiny_dir, **over), "-o", out, "--quiet")
    assert res.exit_code != 0
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert not out.exists() and not (tmp_path / "bad-out.partial").exists()
    return res.output.strip()


def test_bad_inputs_one_clear_line(tmp_path, tiny_dir):
    msg = _bad(tmp_path, tiny_dir, search__speed="fast")
    assert msg.endswith("search.speed: unknown key")
    msg = _bad(tmp_path, tiny_dir, data__calibration__samples="many")
    assert "data.calibration.samples: Input should be a valid integer" in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 1.5})
    assert "search.target.params_removed: must be inside (0, 1), got 1.5" in msg
    msg = _bad(tmp_path, tiny_dir, model=str(tmp_path / "nope"))
    assert msg.endswith(f"model: {tmp_path / 'nope'}: no such file or folder")
    msg = _bad(tmp_path, tiny_dir, search__protect=["attn.0", "mlp.9"])
    assert "search.protect: mlp.9 does not exist in this model (4 layers" in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.9})
    assert "search.target.params_removed: 90% of" in msg and "cannot be reached" in msg
    msg = _bad(tmp_path, tiny_dir, data__calibration__samples=100000)
    assert "data.calibration:" in msg and "too few for 100000 blocks of 32" in msg
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    msg = _bad(tmp_path, tiny_dir, data__calibration={"source": str(small), "samples": 2, "seq_len": 32})
    assert f"data.calibration: {small} has" in msg and "too few" in msg
    msg = _bad(tmp_path, tiny_dir, data__evaluation={"source": "wikitext2", "split": "valid"})
    assert "calibration and evaluation use the same text" in msg
    for m in msg, :
        assert "\n" not in m


def test_target_can_count_non_embedding_parameters(tmp_path, tiny_dir):
    """The tiny model is mostly embedding (49,152 x 64, tied), as Gemma 3 270M is: 20% of all its parameters is
    more than its layers hold (one line that names the count), 20% of its non-embedding ones is a plan that says
    so in plan.json, the report, the card and the command's output; `count: all` leaves old fingerprints alone."""
    from rtk.prune.config import load_recipe

    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.2})
    assert "search.target.params_removed: 20% of" in msg and "(search.target.count: non_embedding counts the rest)" \
        in msg and "\n" not in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.99, "count": "non_embedding"})
    assert "search.target.params_removed: 99% of" in msg and "non-embedding parameters cannot be reached" in msg
    msg = _bad(tmp_path, tiny_dir, search__target={"sublayers": 2, "count": "non_embedding"})
    assert msg.endswith("search.target: count: non_embedding applies to params_removed, not to sublayers")
    msg = _bad(tmp_path, tiny_dir, search__target={"params_removed": 0.2, "count": "body"})
    assert "search.target.count: Input should be 'all' or 'non_embedding'" in msg

    old = recipe(tmp_path, tiny_dir, search__target={"params_removed": 0.2})
    same = recipe(tmp_path, tiny_dir, search__target={"params_removed": 0.2, "count": "all"})
    assert load_recipe(old).fingerprint() == load_recipe(same).fingerprint()

    out = tmp_path / "ne"
    rec = recipe(tmp_path, tiny_dir, search__target={"params_removed": 0.2, "count": "non_embedding"})
    assert load_recipe(rec).fingerprint() != load_recipe(old).fingerprint()
    res = run("prune", rec, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    c = plan["params_counted"]
    assert c == {"count": "non_embedding", "total": plan["params_total"] - 49152 * 64,
                 "removed_fraction": plan["params_removed"] / c["total"]}
    # the search stopped at the first removal that reached 20% of the non-embedding parameters
    assert c["removed_fraction"] >= 0.2 > (plan["params_removed"] - plan["removed"][-1]["params"]) / c["total"]
    said = f"{c['removed_fraction']:.1%} of the {c['total']:,} non-embedding"
    assert said in res.output
    line = f"the target counts the {c['total']:,} non-embedding parameters (embedding and LM head left out)"
    assert line in (out / "report.md").read_text() and line in (out / "model" / "README.md").read_text()


def test_unsupported_architecture_and_bad_yaml(tmp_path, tiny_dir):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    msg = _bad(tmp_path, tiny_dir, model=str(gpt2))
    assert "architecture 'gpt2' is not supported; rtk supports: gemma3_text, llama, mistral, qwen2, qwen3, nemotron-nas" in msg
    notmodel = tmp_path / "empty"
    notmodel.mkdir()
    msg = _bad(tmp_path, tiny_dir, model=str(notmodel))
    assert "folder has no config.json, so it is not a model folder" in msg
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    res = run("prune", broken, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "not valid YAML at line" in res.output
    res = run("prune", tmp_path / "missing.yaml")
    assert res.exit_code == 1 and "recipe file not found" in res.output


def test_shipped_recipes_validate():
    from rtk.prune.config import load_recipe

    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        load_recipe(f)


def test_readme_recipe_block_validates_and_shows_the_defaults():
    """The README's annotated recipe is a valid recipe, and each heal value it shows is the default."""
    from rtk.heal.config import HealConfig
    from rtk.prune.config import parse_recipe

    text = (REPO / "README.md").read_text()
    block = text.split("## Recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(yaml.safe_load(block))
    shown = yaml.safe_load(block)["heal"]
    assert recipe.heal.model_dump(include=set(shown) - {"data"}) == \
        HealConfig().model_dump(include=set(shown) - {"data"})


@pytest.mark.e2e
def test_real_smollm2_small_run(tmp_path, smollm2_dir):
    r = {"model": "embedded:smollm2", "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 64},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 4, "seq_len": 128}},
         "search": {"method": "progressive", "target": {"sublayers": 2}}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    res = run("prune", p, "-o", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["params_total"] == 134_515_008
    assert len(plan["steps"][0]["scores"]) == 59  # 30 MLPs + 29 attentions (attn.0 protected)
    assert 5 < plan["eval"]["ppl_base"] < 100
    assert plan["eval"]["ppl_final"] > 0 and "attn.0" not in plan["removed_sublayers"]


def test_sigterm_unwinds_and_exits_143():
    """SIGTERM unwinds the stack (finally blocks run: servers rtk started are stopped): exit 143, one line."""
    import subprocess
    import sys

    code = ("import os, signal, sys, time, rtk.cli as c\n"
            "@c.main.command()\n"
            "def hang():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "    finally:\n"
            "        print('cleaned up')\n"
            "sys.argv = ['rtk', 'hang']\n"
            "c.run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert r.returncode == 143 and r.stderr.strip() == "rtk: terminated", r.stderr
    assert r.stdout.strip() == "cleaned up"
