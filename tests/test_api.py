"""The Python API: rtk.prune / heal / export / bench in process, their typed results, and bad input raising RtkError
with the line the command prints, nothing half-written. The README's example runs here on a tiny model."""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import rtk
from rtk.cli import main
from rtk.errors import RtkError
from test_prune_cli import recipe, tiny_dir  # noqa: F401 (a fixture: a random 4-layer Llama, SmolLM2's tokenizer)

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The README's Python API block (after its <!-- api-example --> marker)."""
    text = (REPO / "README.md").read_text().split("<!-- api-example", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def raised(fn, *args, **kw) -> str:
    with pytest.raises(RtkError) as exc:
        fn(*args, **kw)
    return exc.value.message


def nothing_at(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.heal
@pytest.mark.onnx
def test_readme_example_runs_in_process(tmp_path, tiny_dir, monkeypatch, capsys):
    """The README block verbatim, in tmp_path, with the tiny model for embedded:smollm2 (its recipe at the
    README's recipe path): every call returns what it wrote, and the bad export is one line, nothing written."""
    from rtk.bench.api import BenchResult
    from rtk.export.api import ExportResult
    from rtk.heal.api import HealResult
    from rtk.prune.api import PruneResult

    (tmp_path / "recipes").mkdir()
    shutil.copy(recipe(tmp_path, tiny_dir), tmp_path / "recipes" / "smollm2-demo.yaml")
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    assert code.count('"embedded:smollm2"') == 1
    ns: dict = {}
    exec(compile(code.replace('"embedded:smollm2"', repr(str(tiny_dir))), "README.md", "exec"), ns)
    pruned, healed, onnx, res = ns["pruned"], ns["healed"], ns["onnx"], ns["res"]

    assert isinstance(pruned, PruneResult) and pruned.out == Path("runs/api-demo")
    plan = json.loads((tmp_path / "runs/api-demo/plan.json").read_text())
    assert pruned.plan == plan and pruned.removed == [e["name"] for e in plan["removed"]] and len(pruned.removed) == 3
    assert (pruned.ppl_before, pruned.ppl_after) == (plan["eval"]["ppl_base"], plan["eval"]["ppl_final"])
    assert pruned.params_removed == plan["params_removed"] and (pruned.model_dir / "config.json").is_file()

    assert isinstance(healed, HealResult)
    h = json.loads((tmp_path / "runs/api-demo-healed/plan.json").read_text())["heal"]
    assert healed.tokens == h["tokens"] == 4096 and healed.method == "full"
    assert (healed.ppl_before, healed.ppl_after) == (h["eval"]["ppl_before"], h["eval"]["ppl_after"])
    assert healed.ppl_before == pruned.ppl_after and healed.ppl_after < healed.ppl_before
    assert healed.loss_curve.is_file() and (healed.model_dir / "config.json").is_file()

    assert isinstance(onnx, ExportResult) and onnx.format == "onnx" and (onnx.out / "model.onnx").is_file()
    assert onnx.max_abs_diff and max(onnx.max_abs_diff.values()) <= onnx.summary["atol"]

    assert isinstance(res, BenchResult) and res.bench_json.is_file() and res.report.is_file()
    written = json.loads(res.bench_json.read_text())
    assert res.models == {"baseline": str(tiny_dir), "candidate1": str(healed.model_dir)}
    assert res.ppl == {m["label"]: m["quality"]["wikitext2"]["ppl"] for m in written["models"]}
    assert res.ppl["candidate1"] == pytest.approx(healed.ppl_after, rel=0.2)  # 16 x 256 test blocks vs the recipe's
    assert len(res.ratios["candidate1"]["b1.decode.tokens_per_s"]["rounds"]) == 2

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "unknown format 'gguf'; rtk exports: safetensors, onnx, per-layer-config"
    assert not Path("runs/api-demo-gguf").exists()


def test_prune_takes_a_recipe_mapping_and_pauses_on_purpose(tmp_path, tiny_dir):
    import yaml

    from rtk.prune.api import SearchPaused

    keys = yaml.safe_load(recipe(tmp_path, tiny_dir, search__target={"sublayers": 2}).read_text())
    out = tmp_path / "out"
    with pytest.raises(SearchPaused, match="paused after 1 step"):
        rtk.prune(keys, out=out, max_steps=1, progress=False, echo=None)
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    res = rtk.prune(keys, out=out, progress=False, echo=None)  # the same call continues
    assert len(res.removed) == 2 and res.plan["steps"][0]["scores"] and not (tmp_path / "out.partial").exists()
    assert raised(rtk.prune, keys) == "out: a recipe given as a mapping needs an output folder (out=...)"


def test_prune_bad_recipe_is_the_cli_line(tmp_path, tiny_dir):
    bad = recipe(tmp_path, tiny_dir, search__method="greedy")
    out = tmp_path / "out"
    msg = raised(rtk.prune, bad, out=out, echo=None)
    r = cli("prune", bad, "-o", out)
    assert r.exit_code == 1 and r.output == f"Error: {msg}\n" and "search.method" in msg
    assert nothing_at(out)
    assert raised(rtk.prune, {"model": str(tiny_dir), "search": {"method": "greedy"}}, out=out).startswith(
        "recipe: search.method: ")


def test_heal_bad_input_is_the_cli_line(tmp_path, tiny_dir):
    out = tmp_path / "healed"
    msg = raised(rtk.heal, tiny_dir, out=out, tokens=0, echo=None)
    r = cli("heal", tiny_dir, "-o", out, "--tokens", 0)
    assert r.exit_code == 1 and r.output == f"Error: {msg}\n" == "Error: heal: tokens: Input should be greater than 0\n"
    msg = raised(rtk.heal, tmp_path / "nope", out=out)
    assert cli("heal", tmp_path / "nope", "-o", out).output == f"Error: {msg}\n"
    assert raised(rtk.heal, tiny_dir, out=out, learning_rate=1e-3) == "heal: learning_rate: unknown key"
    assert nothing_at(out)


def test_export_bad_input_is_the_cli_line(tmp_path, tiny_dir):
    (tmp_path / "taken").mkdir()
    msg = raised(rtk.export, tiny_dir, out=tmp_path / "taken", echo=None)
    r = cli("export", tiny_dir, "-o", tmp_path / "taken")
    assert r.exit_code == 1 and r.output == f"Error: {msg}\n" and "already exists" in msg
    assert not any((tmp_path / "taken").iterdir())
    msg = raised(rtk.export, tiny_dir, format="gguf", out=tmp_path / "g")
    r = cli("export", tiny_dir, "--format", "gguf", "-o", tmp_path / "g")  # a usage error of --format: exit 2
    assert r.exit_code == 2 and r.output.splitlines()[-1] == f"Error: Invalid value for '--format': {msg}"
    msg = raised(rtk.export, tiny_dir, format="onnx", out=tmp_path / "g", dtype="float16")
    assert msg == "--dtype does not apply to --format onnx"
    assert nothing_at(tmp_path / "g")


def test_bench_bad_input_is_the_cli_line(tmp_path, tiny_dir):
    out = tmp_path / "b"
    msg = raised(rtk.bench, baseline=tiny_dir, candidates=[tmp_path / "nope"], out=out, echo=None)
    r = cli("bench", "--baseline", tiny_dir, "--candidate", tmp_path / "nope", "-o", out)
    assert r.exit_code == 1 and r.output == f"Error: {msg}\n" and msg.endswith("nope: no such folder")
    msg = raised(rtk.bench, baseline=tiny_dir, candidates=[tiny_dir], out=out, endpoints=["http://x"])
    assert cli("bench", "--baseline", tiny_dir, "--candidate", tiny_dir, "-o", out, "--endpoint", "http://x"
               ).output == f"Error: {msg}\n"
    assert raised(rtk.bench, baseline=tiny_dir, candidates=[tiny_dir], out=out, rounds=0) == \
        "rtk bench: rounds: Input should be greater than or equal to 1"
    assert raised(rtk.bench, baseline=tiny_dir, candidates=[tiny_dir], out=out, round=2) == \
        "rtk bench: round: unknown key"
    # every bad setting at once, one line each field, in the recipe's words (rtk.settings.format_errors); the
    # settings are checked before the folders, so a missing folder does not hide them
    msg = raised(rtk.bench, baseline=tiny_dir, candidates=[tmp_path / "nope"], out=out, rounds=0, batch_sizes=[],
                 ppl_seq_len=1, chat=1, sweep="all", sweep_rates=[2, -1], limit=True)
    assert msg.split("; ") == ["rtk bench: limit: Input should be a valid integer",
                               "rtk bench: ppl_seq_len: Input should be greater than or equal to 2",
                               "rtk bench: rounds: Input should be greater than or equal to 1",
                               "rtk bench: batch_sizes: List should have at least 1 item after validation, not 0",
                               "rtk bench: chat: Input should be a valid boolean",
                               "rtk bench: sweep: Input should be 'guidellm' or 'rates'",
                               "rtk bench: sweep_rates.1: Input should be greater than 0"]
    r = cli("bench", "--baseline", tiny_dir, "--candidate", tiny_dir, "-o", out, "--rounds", 0, "--concurrency",
            "1,0", "--ppl-seq-len", 1, "--sweep-seconds", 4)
    assert r.exit_code == 1 and r.output == (
        "Error: rtk bench: ppl_seq_len: Input should be greater than or equal to 2; "
        "rtk bench: rounds: Input should be greater than or equal to 1; "
        "rtk bench: concurrency.1: Input should be greater than or equal to 1; "
        "rtk bench: sweep_seconds: Input should be greater than or equal to 5\n")
    r = cli("bench", "--baseline", tiny_dir, "--candidate", tiny_dir, "-o", out, "--batch-sizes", "1,x")
    assert r.exit_code == 1 and r.output == "Error: --batch-sizes: expected integers separated by commas, got '1,x'\n"
    assert nothing_at(out)


def test_stages_stay_packages_and_import_rtk_stays_cheap():
    """rtk.prune is both the package (rtk.prune.run, ...) and the call; `import rtk` and naming a stage import no
    torch; the call's signature is the api function's."""
    import rtk.heal.run as heal_run

    assert callable(rtk.heal) and heal_run.run_heal and rtk.heal.run is heal_run
    assert list(inspect.signature(rtk.heal).parameters)[:2] == ["pruned_dir", "out"]
    assert rtk.RtkError is RtkError
    code = ("import sys, inspect, rtk; rtk.prune; rtk.heal; rtk.export; rtk.bench; inspect.signature(rtk.export); "
            "print(sorted(m for m in ('torch', 'transformers', 'click') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['click']"  # rtk.export's errors are click exceptions (the CLI prints them)


def test_prune_and_bench_report_the_same_test_ppl_at_their_defaults(tmp_path, tiny_dir):
    """One evaluation default (rtk.data.EVALUATION): a recipe without data.evaluation and `rtk bench` without
    --ppl-samples/--ppl-seq-len read the same blocks of WikiText-2 test, so the dense and the pruned model get
    the PPLs plan.json's `eval` records."""
    from rtk.data import EVALUATION

    keys = yaml.safe_load(recipe(tmp_path, tiny_dir).read_text())
    del keys["data"]["evaluation"]
    res = rtk.prune(keys, out=tmp_path / "p", progress=False, echo=None)
    ev = res.plan["eval"]
    assert (ev["split"], ev["samples"], ev["seq_len"]) == (EVALUATION.split, EVALUATION.samples, EVALUATION.seq_len)
    b = rtk.bench(baseline=tiny_dir, candidates=[tmp_path / "p" / "model"], out=tmp_path / "b", tasks="none",
                  speed=False, echo=None)
    wt = b.result["models"][0]["quality"]["wikitext2"]
    assert (wt["split"], wt["samples"], wt["seq_len"]) == (ev["split"], ev["samples"], ev["seq_len"])
    assert b.ppl["baseline"] == pytest.approx(ev["ppl_base"], rel=1e-5)
    assert b.ppl["candidate1"] == pytest.approx(ev["ppl_final"], rel=1e-5)
    assert ev["ppl_final"] != pytest.approx(ev["ppl_base"], rel=1e-3)  # two models: the test tells them apart
