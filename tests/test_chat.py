"""Chat models: what rtk writes keeps the source's chat template, generation config and special tokens (every
export layout, ONNX, healing), proven on the SmolLM2-Instruct chat model; `rtk bench --chat` refuses what it
cannot measure. The served side (vLLM answering /v1/chat/completions, bench --chat) is tests/test_vllm_chat.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rtk
from rtk.errors import RtkError

CHAT = [{"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}]
# a chat model's generation config: stop at end-of-turn or end-of-text, sample by default
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2, "do_sample": True, "temperature": 0.6,
              "top_p": 0.9}


def chat_files(folder) -> dict:
    """What a chat client reads from a folder: the rendered conversation (text and ids), the generation config
    as written, the special tokens and config.json's token ids."""
    from transformers import GenerationConfig

    from rtk.model.load import load_tokenizer, read_config

    tok = load_tokenizer(str(folder))
    gen = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
    gen.pop("transformers_version", None)
    cfg = read_config(folder)
    return {"text": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
            "ids": tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False),
            "generation": gen,
            "special": {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                     "all_special_tokens", "all_special_ids")},
            "added": {i: str(t) for i, t in tok.added_tokens_decoder.items()},
            "config_ids": {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}


@pytest.mark.e2e
def test_pruned_smollm2_instruct_keeps_its_chat_template_generation_config_and_special_tokens(
        smollm2_dir, smollm2_pruned_dir):
    src, pruned = chat_files(smollm2_dir), chat_files(smollm2_pruned_dir)
    assert src["text"].endswith("<|im_start|>assistant\n") and "<|im_start|>system\nYou answer in one word." in \
        src["text"]  # the Instruct model's template renders the conversation
    assert pruned == src
    assert src["special"]["eos_token"] == "<|im_end|>" and src["generation"]["eos_token_id"] == 2


@pytest.fixture(scope="module")
def chat_tiny(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2-Instruct's tokenizer and chat template and a chat generation config."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(**GENERATION).save_pretrained(out)
    return out


def plan_file(tmp_path, names) -> Path:
    p = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}.json"
    p.write_text(json.dumps({"removed_sublayers": names}))
    return p


@pytest.mark.onnx
@pytest.mark.heal
def test_every_export_and_healing_keeps_the_chat_files(tmp_path, chat_tiny):
    """Each safetensors layout, the per-layer-config format, ONNX (with onnxruntime-genai's stop tokens and
    sampling defaults from the generation config) and a healed folder: the same chat files as the source."""
    src = chat_files(chat_tiny)
    assert src["generation"] | GENERATION == src["generation"]
    layouts = {"standard": ["layer.2"], "native": ["attn.1", "mlp.2"], "plugin": ["attn.0"]}
    for layout, names in layouts.items():
        res = rtk.export(chat_tiny, out=tmp_path / layout, plan=plan_file(tmp_path, names), echo=None)
        assert res.layout == layout and chat_files(res.out) == src, layout
    res = rtk.export(chat_tiny, format="per-layer-config", out=tmp_path / "plc", plan=plan_file(tmp_path, ["mlp.1"]),
                     echo=None)
    assert chat_files(res.out) == src
    onnx = rtk.export(tmp_path / "native", format="onnx", out=tmp_path / "onnx", echo=None)
    assert chat_files(onnx.out) == src
    genai = json.loads((onnx.out / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == [2, 0] and genai["model"]["pad_token_id"] == 2
    assert {k: genai["search"][k] for k in ("do_sample", "temperature", "top_p", "top_k")} == \
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 1}  # top_k: not set by the source
    healed = rtk.heal(tmp_path / "native", out=tmp_path / "healed", teacher=str(chat_tiny), tokens=1024,
                      progress=False, echo=None, data={"source": "wikitext2", "split": "valid", "seq_len": 64})
    assert chat_files(healed.model_dir) == src


def test_a_hub_models_generation_config_comes_from_the_hub_cache(tmp_path, monkeypatch):
    """A model named by hub id is loaded from the hub cache; its generation_config.json is kept from there."""
    import huggingface_hub.constants as hub

    from rtk.export.safetensors import generation_config_of

    repo = tmp_path / "models--rtk-test--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "generation_config.json").write_text(json.dumps(GENERATION))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    gen = generation_config_of("rtk-test/tiny-chat")
    assert gen is not None and gen.temperature == 0.6 and gen.eos_token_id == [2, 0]
    assert generation_config_of("rtk-test/not-cached") is None
    assert generation_config_of(str(tmp_path)) is None  # a folder without the file


def test_bench_chat_refuses_what_it_cannot_measure(tmp_path, chat_tiny, tiny_folder):
    from click.testing import CliRunner

    from rtk.cli import main

    out = tmp_path / "b"
    with pytest.raises(RtkError) as exc:
        rtk.bench(baseline=chat_tiny, candidates=[chat_tiny], out=out, chat=True, echo=None)
    assert exc.value.message.startswith("--chat: chat requests are a served measurement (--backend vllm or openai)")
    r = CliRunner().invoke(main, ["bench", "--baseline", str(chat_tiny), "--candidate", str(chat_tiny), "-o",
                                  str(out), "--chat"])
    assert r.exit_code == 1 and r.output == f"Error: {exc.value.message}\n"
    with pytest.raises(RtkError, match=f"--chat: {tiny_folder} has no chat template"):  # before any server starts
        rtk.bench(baseline=chat_tiny, candidates=[tiny_folder], out=out, backend="vllm", chat=True, echo=None)
    assert not out.exists() and not (tmp_path / "b.partial").exists()


def test_chat_requests_in_vllm_bench_serve_and_guidellm(tmp_path):
    """--chat asks vLLM's benchmark for chat requests (its own parser accepts them) and GuideLLM for its chat
    format."""
    from rtk.bench.speed import vllm_serve
    from rtk.bench.speed.sweep import guidellm_scenario

    kw = dict(num_prompts=2, input_len=16, output_len=4, concurrency=1, seed=0)
    plain = vllm_serve.bench_args("http://h:1", "m", "tok", **kw)
    chat = vllm_serve.bench_args("http://h:1", "m", "tok", chat=True, **kw)
    ns = vllm_serve._parser().parse_args(chat)
    assert (ns.backend, ns.endpoint) == ("openai-chat", "/v1/chat/completions") and ns.ignore_eos
    assert vllm_serve._parser().parse_args(plain).endpoint == "/v1/completions"
    assert [a for a in chat if a not in plain] == ["openai-chat", "/v1/chat/completions"]
    spec = guidellm_scenario("http://h:1", "m", "tok", 16, 4, 5, 3, tmp_path / "r.json", chat=True)["spec"]
    assert spec["backend"]["request_format"] == "/v1/chat/completions"
    assert guidellm_scenario("http://h:1", "m", "tok", 16, 4, 5, 3, tmp_path / "r.json")["spec"]["backend"][
        "request_format"] == "/v1/completions"


def test_chat_template_tokens_counts_what_a_chat_request_adds(chat_tiny):
    from rtk.bench.run import chat_template_tokens
    from rtk.model.load import load_tokenizer

    tok = load_tokenizer(str(chat_tiny))
    n = chat_template_tokens(str(chat_tiny))
    text = "the tower is 324 metres tall"
    wrapped = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    assert n == 30 and len(wrapped) == n + len(tok(text, add_special_tokens=False)["input_ids"])
