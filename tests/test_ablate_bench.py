"""rtk ablate --bench: the measurement stage on a complete ablation (tiny model, scripted server),
the arithmetic of speedups and of "PPL at equal measured speed"."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from rtk.records.ablation import equal_speed, ppl_at_speed
from rtk.ablate.measure import Workload, speedups
from rtk.model.load import rtk_config_of
from rtk.model.cost import model_params

WL = (Workload("short", 2, 8, 4, 1), Workload("kv-heavy", 2, 16, 4, 2))


class FakeServed:
    """A 'server' whose speed is a fixed function of the folder's parameter count: output tokens/s
    = 1e9 / params, TPOT = params / 1e6 ms, TTFT = 2 * TPOT; the dense one drifts by `drift` per round."""

    opened: list["FakeServed"] = []
    loads: list[tuple[str, int, int]] = []

    def __init__(self, folder, log_dir, dtype):
        self.folder, self.params = folder, model_params(rtk_config_of(folder))
        self.closed = False
        FakeServed.opened.append(self)

    def serve_load(self, num_prompts, input_len, output_len, concurrency, seed, result_file, log=None):
        assert not self.closed
        FakeServed.loads.append((self.folder, input_len, concurrency))
        tpot = self.params / 1e6
        return {"median_ttft_ms": 2 * tpot, "median_tpot_ms": tpot, "median_itl_ms": tpot,
                "median_e2el_ms": 2 * tpot + (output_len - 1) * tpot, "output_throughput": 1e9 / self.params,
                "request_throughput": 1.0, "completed": num_prompts, "failed": 0, "duration": 1.0}

    def close(self):
        self.closed = True


def fake_lm_eval(spec, work, label, echo=print):
    """rtk.bench.accuracy.harness.run without lm-eval (tested in test_bench_accuracy / test_vllm_bench): acc
    from the folder's parameter count, n = the limit, for the tasks asked."""
    p = model_params(rtk_config_of(spec.model_args["pretrained"]))
    assert spec.model == "hf" and spec.tasks.lm_eval_names == ("rtk_piqa", "rtk_arc_easy")
    docs = {t: {"doc_id": list(range(spec.limit)), "acc": [float((p + i) % 3 == 0) for i in range(spec.limit)]}
            for t in spec.tasks.names}
    return {"command": spec.command(), "tasks": {t: {"acc": p % 97 / 97, "acc_stderr": 0.1, "acc_norm": 0.5,
                                                     "acc_norm_stderr": 0.1, "n": spec.limit}
                                                 for t in spec.tasks.names}, "per_doc": docs}


def test_speedups_are_per_round_ratios():
    w = (Workload("short", 1, 1, 1, 1),)
    base = [{"short": {"output_throughput": 10.0, "median_tpot_ms": 4.0, "median_ttft_ms": 8.0}},
            {"short": {"output_throughput": 20.0, "median_tpot_ms": 2.0, "median_ttft_ms": 4.0}}]
    cand = [{"short": {"output_throughput": 12.0, "median_tpot_ms": 3.0, "median_ttft_ms": 8.0}},
            {"short": {"output_throughput": 26.0, "median_tpot_ms": 1.6, "median_ttft_ms": 2.0}}]
    s = speedups(base, cand, w)["short"]
    assert s["throughput"]["rounds"] == pytest.approx([1.2, 1.3])
    assert s["tpot"]["rounds"] == pytest.approx([4 / 3, 1.25])  # dense / candidate latency
    assert s["ttft"]["rounds"] == pytest.approx([1.0, 2.0]) and s["ttft"]["spread_includes_1"] is True
    assert s["throughput"]["median"] == pytest.approx(1.25)


def test_ppl_at_equal_measured_speed_by_hand():
    pts = [(1.0, 10.0), (1.2, 20.0), (1.5, 80.0)]
    assert ppl_at_speed(pts, 1.1) == pytest.approx(math.sqrt(10 * 20))  # halfway in log PPL
    assert ppl_at_speed(pts, 1.35) == pytest.approx(40.0)
    assert math.isnan(ppl_at_speed(pts, 1.6))
    res = {"dense": {"eval_ppl": 10.0}, "rows": [
        {"variant": "a", "eval_ppl": 20.0, "bench": {"served": {"speedup": {"short": {"throughput": {"median": 1.2}}}}}},
        {"variant": "b", "eval_ppl": 15.0, "bench": {"served": {"speedup": {"short": {"throughput": {"median": 1.1}}}}}},
        {"variant": "b", "eval_ppl": 30.0, "bench": {"served": {"speedup": {"short": {"throughput": {"median": 1.3}}}}}},
    ]}
    # c: its 30% point (1.25x, PPL 90) is slower and worse than its 20% point (1.3x, 50): not on its curve
    res["rows"] += [{"variant": "c", "eval_ppl": p, "bench": {"served": {"speedup": {"short": {"throughput": {"median": x}}}}}}
                    for x, p in ((1.3, 50.0), (1.25, 90.0))]
    assert equal_speed(res, speeds=(1.2,))["1.20"]["ppl"]["c"] == pytest.approx(10 * 5 ** (2 / 3))
    res["rows"] = res["rows"][:3]
    e = equal_speed(res, speeds=(1.10, 1.20, 1.25))
    assert e["1.10"]["winner"] == "a" and e["1.10"]["ppl"]["b"] == pytest.approx(15.0)
    assert e["1.10"]["ppl"]["a"] == pytest.approx(math.sqrt(200))
    assert e["1.20"]["winner"] == "a" and e["1.20"]["ppl"]["b"] == pytest.approx(math.sqrt(15 * 30))
    assert "1.25" not in e  # only b reaches 1.25
    for r in res["rows"]:  # another workload is read from its own speedups
        r["bench"]["served"]["speedup"]["kv"] = {"throughput": {"median": 2 * r["bench"]["served"]["speedup"]["short"]["throughput"]["median"] - 1}}
    k = equal_speed(res, speeds=(1.20, 1.30, 1.50), workload="kv")
    assert k["1.20"]["ppl"]["a"] == pytest.approx(math.sqrt(200)) and "1.50" not in k  # a reaches 1.4 only
    assert k["1.30"]["ppl"]["a"] == pytest.approx(10 * 2 ** 0.75) and k["1.30"]["winner"] == "a"


def test_cli_ablate_bench_measures_every_model_once_and_resumes(tmp_path, tiny_folder, monkeypatch):
    import rtk.ablate.measure as ab
    from rtk.cli import main

    from test_ablate import _recipe  # the tiny recipe of the ablate end-to-end test

    rec, out = _recipe(tmp_path, tiny_folder), tmp_path / "abl"
    base = ["ablate", str(rec), "-o", str(out), "--targets", "0.01,0.03", "--variants",
            "params-oneshot,blocks-bi", "--quiet"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    before = json.loads((out / "ablation.json").read_text())
    folders = {row["model_dir"] for row in before["rows"]}

    FakeServed.opened, FakeServed.loads = [], []
    real_init = ab.AblationBench.__init__
    crash = {"after": 2}

    def init(self, cfg, log_dir, echo=print, **kw):
        cfg.workloads = WL
        real_init(self, cfg, log_dir, echo, open_served=FakeServed)
        real_measure = self.measure

        def measure(folder, dense=False):
            if crash["after"] == 0:
                raise RuntimeError("simulated crash")
            crash["after"] -= 1
            return real_measure(folder, dense)
        self.measure = measure

    monkeypatch.setattr(ab.AblationBench, "__init__", init)
    from rtk.bench.accuracy import harness

    monkeypatch.setattr(harness, "run", fake_lm_eval)
    args = base + ["--bench", "--bench-tasks", "piqa,arc_easy", "--bench-limit", "3", "--bench-rounds", "2"]
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, RuntimeError), r.output  # dense + one model measured, then a crash
    saved = json.loads((out / "state" / "bench.json").read_text())
    assert len(saved["models"]) == 2 and "dense" in saved["models"]
    assert FakeServed.opened and all(f.closed for f in FakeServed.opened)  # closed on the crash too
    crash["after"] = 10 ** 6
    opened_before = len(FakeServed.opened)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "measuring its models" in r.output
    res = json.loads((out / "ablation.json").read_text())
    saved = json.loads((out / "state" / "bench.json").read_text())
    assert set(saved["models"]) == {"dense"} | folders  # each distinct plan measured once, nothing twice
    # the resumed run measured only what was missing: dense server + one server per remaining folder
    assert len(FakeServed.opened) - opened_before == 1 + len(folders) - 1
    assert all(f.closed for f in FakeServed.opened)
    dense_params = model_params(rtk_config_of(str(tiny_folder)))
    for row in res["rows"]:
        b = row["bench"]
        p = model_params(rtk_config_of(str(out / row["model_dir"])))
        assert p == res["params_total"] - row["params_removed"]
        for w in WL:
            sp = b["served"]["speedup"][w.name]
            assert sp["throughput"]["rounds"] == pytest.approx([dense_params / p] * 2)
            assert sp["tpot"]["median"] == pytest.approx(dense_params / p)
        zs = b["zero_shot"]
        assert set(zs["tasks"]) == {"piqa", "arc_easy"} and zs["docs"] == 6 and zs["tasks"]["piqa"]["n"] == 3
        assert zs["tasks"]["piqa"]["acc"] == pytest.approx(p % 97 / 97)
        assert zs["avg_acc_stderr"] == pytest.approx(0.1 * 2 ** 0.5 / 2)
        assert zs["avg_acc"] == pytest.approx((zs["tasks"]["piqa"]["acc"] + zs["tasks"]["arc_easy"]["acc"]) / 2)
    # every load used the configured workloads, interleaved dense / candidate
    assert {(n, c) for _, n, c in FakeServed.loads} == {(8, 1), (16, 2)}
    md = (out / "ablation.md").read_text()
    assert "## Measured (rtk ablate --bench)" in md and "short tok/s x" in md and "kv-heavy TTFT x" in md
    assert "highest measured speedup" in md
    # each variant against the dense model on the same documents and blocks: an interval and its verdict
    for row in res["rows"]:
        vs, ev = row["bench"]["zero_shot_vs_dense"], row["eval_vs_dense"]
        assert vs["n"] == {"arc_easy": 3, "piqa": 3} and vs["low"] <= vs["diff"] <= vs["high"]
        assert ev["n"] == len(row["eval_block_nll"]) and ev["verdict"] in ("better", "worse", "no difference shown")
        assert f"| {row['variant']} | {row['target']:.0%} | {ev['diff']:+.3f} [{ev['low']:+.3f}, {ev['high']:+.3f}] | " \
               f"{ev['verdict']} | {vs['diff']:+.3f} [" in md
    assert "## Against the dense model (paired)" in md
    # each winner's lead over the runner-up, paired, beside the winner's name
    for kind in ("ppl", "zero_shot"):
        for t, lead in res["leads"][kind].items():
            rows = [r for r in res["rows"] if r["target"] == float(t)]
            assert {lead["best"], lead["runner_up"]} <= {r["variant"] for r in rows} and len(rows) > 1
            assert f"**{lead['best']}** (over {lead['runner_up']}: {lead['diff']:+.3f} [" in md
    best = min((r for r in res["rows"] if r["target"] == 0.03), key=lambda r: r["eval_ppl"])
    assert res["leads"]["ppl"]["0.03"]["best"] == best["variant"] and res["leads"]["ppl"]["0.03"]["diff"] <= 0
    assert (out / "measured_speedup_vs_ppl.png").stat().st_size > 0
    # the same command again measures nothing; other settings are refused
    n = len(FakeServed.opened)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and len(FakeServed.opened) == n, r.output
    r = CliRunner().invoke(main, args[:-2] + ["--bench-rounds", "1"])
    assert r.exit_code == 1 and "holds measurements made with other settings" in r.output


def test_bench_tasks_none_runs_no_lm_eval(tmp_path, monkeypatch):
    """--bench-tasks none measures served speed only: no lm-eval run (it refused an empty task list before)."""
    import math

    from rtk.ablate import measure
    from rtk.bench.accuracy import harness

    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("lm-eval ran with no tasks"))
    q = measure.zero_shot(str(tmp_path), [], 10, "float32", tmp_path, "dense")
    assert q["tasks"] == {} and q["docs"] == 0 and math.isnan(q["avg_acc"]) and q["lm_eval_command"] is None


def test_speed_only_report_shows_no_nan():
    """A --bench-tasks none ablation (bench/results/gemma3-270m, recorded) renders '-' for zero-shot, never nan."""
    from rtk.records.ablation import markdown

    from conftest import REPO

    res = json.loads((REPO / "bench" / "results" / "gemma3-270m" / "ablation.json").read_text())
    assert res["bench_config"]["tasks"] == []
    md = markdown(res)
    assert "nan" not in md and "| dense | 0% | 0.0% | 27.435 | - |" in md


@pytest.mark.heal
def test_heal_then_bench_measures_the_healed_models_zero_shot_without_serving_them(tmp_path, tiny_folder,
                                                                                    data_dir, monkeypatch):
    """`rtk ablate --heal --bench`: every healed folder gets lm-eval zero-shot (the issue's healed metric) and no
    server of its own (its shapes are its pruned folder's); the report shows zero-shot before and after healing,
    and a rerun measures nothing."""
    import rtk.ablate.measure as ab
    from rtk.bench.accuracy import harness
    from rtk.cli import main

    from test_heal import heal_keys, write_yaml

    text = tmp_path / "heal.txt"
    text.write_text((data_dir / "wikitext-2-raw" / "valid.txt").read_text()[:20000])
    r = {"model": str(tiny_folder), "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 2, "seq_len": 32}},
         "heal": heal_keys(text, eval_every=0, tokens=128), "cost": {"batch": 4, "context": 256}}
    out = tmp_path / "abl"
    base = ["ablate", str(write_yaml(tmp_path / "abl.yaml", r)), "-o", str(out), "--targets", "0.03",
            "--variants", "params-oneshot,none-oneshot", "--quiet", "--heal"]
    FakeServed.opened, FakeServed.loads = [], []
    real_init = ab.AblationBench.__init__

    def init(self, cfg, log_dir, echo=print, **kw):
        cfg.workloads = WL
        real_init(self, cfg, log_dir, echo, open_served=FakeServed)

    monkeypatch.setattr(ab.AblationBench, "__init__", init)
    evaluated = []

    def lm_eval(spec, work, label, echo=print):
        evaluated.append(spec.model_args["pretrained"])
        return fake_lm_eval(spec, work, label, echo)

    monkeypatch.setattr(harness, "run", lm_eval)
    args = base + ["--bench", "--bench-tasks", "piqa,arc_easy", "--bench-limit", "3", "--bench-rounds", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    abl = json.loads((out / "ablation.json").read_text())
    healed = {row["healed"]["model_dir"] for row in abl["rows"]}
    pruned = {row["model_dir"] for row in abl["rows"]}
    assert len(healed) == len(pruned) >= 1 and not healed & pruned
    served = {Path(f.folder).name for f in FakeServed.opened}
    assert not served & {Path(h).name for h in healed}  # no healed folder was served
    assert {Path(p).name for p in evaluated} >= {Path(h).name for h in healed}
    for row in abl["rows"]:
        zs = row["healed"]["bench"]["zero_shot"]
        assert zs["docs"] == 6 and "served" not in row["healed"]["bench"]
        p = model_params(rtk_config_of(str(out / row["healed"]["model_dir"])))
        assert zs["tasks"]["piqa"]["acc"] == pytest.approx(p % 97 / 97)
    best = max(abl["rows"], key=lambda row: row["healed"]["bench"]["zero_shot"]["avg_acc"])["variant"]
    assert abl["winners"]["healed_zero_shot"] == {"0.03": best}
    md = (out / "ablation.md").read_text()
    assert "zero-shot avg pruned | after healing |" in md and f"best zero-shot after healing **{best}**" in md
    if len(abl["rows"]) > 1:  # each lead after healing beside its winner, with its paired interval
        hz, hp = abl["leads"]["healed_zero_shot"]["0.03"], abl["leads"]["healed_ppl"]["0.03"]
        assert hz["best"] == best and f"**{best}** (over {hz['runner_up']}: {hz['diff']:+.3f} [" in md
        assert hp["best"] == min(abl["rows"], key=lambda row: row["healed"]["eval_ppl"])["variant"]
        assert hp["n"] == 2 and f"after **{hp['best']}** (over {hp['runner_up']}: " in md
    n, m = len(FakeServed.opened), len(evaluated)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and (len(FakeServed.opened), len(evaluated)) == (n, m), res.output
