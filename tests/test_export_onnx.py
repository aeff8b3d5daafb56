"""`rtk export --format onnx`: tiny models (fast tier) and the pruned SmolLM2 (e2e)."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import save_native, tiny_hf, tiny_rtk
from rtk.cli import main
from rtk.errors import RtkError
from rtk.export.onnx import ATOL, export_onnx, torch_greedy, validate
from rtk.export.onnx_runtime import OrtLM
from rtk.model.load import load_model
from rtk.export.safetensors import export_model
from rtk.model.rewrite import apply_plan
from rtk.prune.scoring import ModelScorer

pytestmark = pytest.mark.onnx

PRUNE = ["attn.1", "mlp.1", "attn.2"]  # layer 1 has nothing left, layer 2 has no attention


def tiny_tokenizer(vocab: int = 128, bos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2",
                                   add_bos_token=bos)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Four exports, by four routes: {case: (folder, torch model, attention layers)}."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    # 1. a standard tied Llama folder through the CLI
    src = root / "llama-src"
    tiny_hf("llama", layers=2, tie=True).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    res = CliRunner().invoke(main, ["export", str(src), "--format", "onnx", "-o", str(root / "llama")])
    assert res.exit_code == 0, res.output
    assert re.search(r"rtk: wrote .*llama \(onnx\) in [\d.]+s; validated: max \|diff\| ", res.output)
    out["llama-tied"] = (root / "llama", load_model(str(src))[0], [0, 1])
    # 2. an untied Qwen2 (q/k/v biases) in process
    model = tiny_rtk("qwen2", layers=2, tie=False)
    src = root / "qwen2-src"
    save_native(model, tiny_tokenizer(), src)
    export_onnx(str(src), root / "qwen2")
    out["qwen2-untied"] = (root / "qwen2", model, [0, 1])
    # 3. a pruned (nemotron-nas) folder: a layer with both sublayers removed, one without attention
    pruned = apply_plan(tiny_rtk("llama", layers=4, tie=False, seed=3), PRUNE)
    src = root / "pruned-src"
    save_native(pruned, tiny_tokenizer(), src)
    export_onnx(str(src), root / "pruned")
    out["pruned"] = (root / "pruned", pruned, [0, 3])
    # 4. a pruned Gemma 3 in rtk's plugin format: a sliding and a global attention left (window 4, shorter than
    #    every validation and test sequence, so the sliding masks are in the graph and matter)
    gemma = tiny_rtk("gemma3", layers=4)
    src = root / "gemma3-src"
    export_model(apply_plan(gemma, PRUNE), tiny_tokenizer(bos=True), src, original=gemma)
    export_onnx(str(src), root / "gemma3")
    out["gemma3-pruned"] = (root / "gemma3", load_model(str(src))[0], [0, 3])
    return out


CASES = ["llama-tied", "qwen2-untied", "pruned", "gemma3-pruned"]


@pytest.mark.parametrize("case", CASES)
def test_graph_io_and_files(exported, case):
    folder, model, attn = exported[case]
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.onnx.data", "config.json",
                                                 "genai_config.json", "tokenizer.json"}
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kv = [f"{i}.{p}" for i in range(len(attn)) for p in ("key", "value")]
    assert [i.name for i in proto.graph.input] == (["input_ids", "attention_mask", "position_ids"]
                                                   + [f"past_key_values.{x}" for x in kv])
    assert [o.name for o in proto.graph.output] == ["logits"] + [f"present.{x}" for x in kv]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rtk_onnx"]["attention_layers"] == attn
    assert all(d <= ATOL for d in cfg["rtk_onnx"]["max_abs_diff"].values())
    # the embedding matrix (and the head, when untied) is stored exactly once
    big = [x for x in proto.graph.initializer if math.prod(x.dims) == 128 * 64]
    assert len(big) == (1 if model.config.tie_word_embeddings else 2)
    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["num_hidden_layers"] == len(attn)


@pytest.mark.parametrize("case", CASES)
def test_ort_logprobs_ppl_greedy_match_torch(exported, case):
    folder, model, _ = exported[case]
    lm = OrtLM(folder)
    seqs = [list(range(3, 40)), [5, 9, 100, 7, 64, 3, 3, 80], list(range(120, 20, -7))]
    got = lm.token_logprobs(seqs, batch_size=2)
    for s, g in zip(seqs, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s]), use_cache=False).logits[0, :-1], -1)
        ref = ref.gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
        assert len(g) == len(s) - 1
        np.testing.assert_allclose(g, ref.numpy(), atol=1e-4)
    blocks = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(5))
    ref_ppl = ModelScorer(model, blocks, batch_size=2, progress=False).ppl()
    assert lm.ppl(blocks) == pytest.approx(ref_ppl, rel=1e-5)
    prompt = [1, 17, 40, 99, 23]
    with torch.no_grad():  # reference without any cache: full recompute each step
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert lm.greedy(prompt, 10) == ids[len(prompt):] == torch_greedy(model, prompt, 10)
    # a batch decodes each row as it would alone
    batch = [prompt, [9, 8, 7, 6, 5], [100, 3, 3, 3, 60]]
    assert lm.greedy_batch(batch, 6) == [torch_greedy(model, p, 6) for p in batch]
    with pytest.raises(RtkError, match="equal lengths"):
        lm.greedy_batch([prompt, prompt[:3]], 2)


def test_onnx_bench_backend_decodes_a_real_batch(exported, monkeypatch):
    from rtk.bench.backends import OnnxBackend

    folder, _, _ = exported["pruned"]
    b = OnnxBackend(str(folder))
    calls = []
    real = b.lm.greedy_batch
    monkeypatch.setattr(b.lm, "greedy_batch", lambda ps, n: calls.append((len(ps), n)) or real(ps, n))
    r = b.speed(3, prompt_len=8, gen_len=4, repeats=2, warmup=1)
    assert calls == [(3, 2), (3, 1), (3, 5), (3, 1), (3, 5)]  # one batched call per timing, never row by row
    assert r["batch"] == 3 and r["prefill"]["repeats"] == 2
    assert r["prefill"]["tokens_per_s"] > 0 and r["decode"]["tokens_per_s"] > 0


def genai_greedy(folder, prompt, n):
    import onnxruntime_genai as og

    m = og.Model(str(folder))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]


def upto_eos(tokens, eos):
    """onnxruntime-genai stops at EOS and leaves it out of the sequence."""
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("case", CASES)
def test_genai_runs_the_folder(exported, case):
    folder, model, _ = exported[case]
    for prompt in ([1, 17, 40, 99, 23], [3, 3, 8, 127, 64, 12, 90]):
        ref = upto_eos(torch_greedy(model, prompt, 12), model.config.eos_token_id)
        assert genai_greedy(folder, prompt, 12) == ref


def test_validation_names_the_mismatching_output(exported):
    folder, model, _ = exported["qwen2-untied"]
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.norm.weight.mul_(1.5)  # changes logits only
    with pytest.raises(RtkError, match=r"onnx validation: output 'logits' differs from torch by [\d.e+-]+ "
                                       r"\(tolerance 0.001\) at prefill"):
        validate(folder, bad)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[1].self_attn.v_proj.bias.add_(0.5)  # attention index 1
    with pytest.raises(RtkError, match=r"output 'present.1.value' differs"):
        validate(folder, bad)


def test_reloaded_pruned_folder_has_its_rope_buffer(tmp_path):
    """from_pretrained never loads the non-persistent inv_freq; _init_weights must compute it."""
    model = tiny_rtk("qwen2", layers=2, tie=False)
    save_native(model, None, tmp_path / "m")
    again = load_model.__globals__["RtkDeciLMForCausalLM"].from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.model.inv_freq, model.model.inv_freq, rtol=0, atol=0)


# ---- bad input: one clear line, exit != 0, nothing written ------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_unknown_format(tmp_path):
    res = run_cli(tmp_path, "--format", "tflite", "-o", tmp_path / "out")
    assert res.exit_code == 2  # a usage error, listing every format
    assert res.output.strip().splitlines()[-1] == ("Error: Invalid value for '--format': unknown format 'tflite'; "
                                                   "rtk exports: safetensors, onnx, per-layer-config")
    assert not (tmp_path / "out").exists()


def test_missing_folder(tmp_path):
    res = run_cli(tmp_path / "nope", "--format", "onnx", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output == f"Error: model: {tmp_path / 'nope'}: no such folder\n"
    assert not (tmp_path / "out").exists()


def test_unsupported_model(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    res = run_cli(tmp_path / "gpt2", "--format", "onnx", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: model: {tmp_path / 'gpt2'}: architecture 'gpt2' is not supported; "
                                 "rtk supports: gemma3_text, llama, mistral, qwen2, qwen3, nemotron-nas (rtk-pruned)")
    assert not (tmp_path / "out").exists()


def test_output_exists(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    res = run_cli(tmp_path, "--format", "onnx", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output == f"Error: out: {tmp_path / 'out'} already exists and is not an empty folder\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failed_validation_leaves_nothing(tmp_path, monkeypatch):
    import rtk.export.onnx as ox

    src = tmp_path / "src"
    save_native(tiny_rtk("llama", layers=1), tiny_tokenizer(), src)
    seen = {}

    def fail(folder, model, atol=ATOL):
        seen["files"] = sorted(p.name for p in Path(folder).iterdir())
        raise RtkError("onnx validation: output 'logits' differs from torch by 1 (tolerance 0.001) at prefill")

    monkeypatch.setattr(ox, "validate", fail)
    res = run_cli(src, "--format", "onnx", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output.endswith("Error: onnx validation: output 'logits' differs from torch by 1 "
                               "(tolerance 0.001) at prefill\n")
    assert seen["files"] == ["model.onnx", "model.onnx.data"]  # the graph was written, in a temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- e2e: the pruned SmolLM2 -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_pruned_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-onnx") / "onnx"
    report = export_onnx(str(smollm2_pruned_dir), out)
    model, tok, _ = load_model(str(smollm2_pruned_dir))
    return out, model, tok, report


@pytest.mark.e2e
def test_smollm2_pruned_ppl_and_greedy(smollm2_onnx):
    from rtk.data import token_blocks
    from rtk.data import DataSpec

    folder, model, tok, report = smollm2_onnx
    assert all(d <= ATOL for d in report["max_abs_diff"].values())
    blocks, _ = token_blocks(tok, DataSpec(source="wikitext2", split="test", samples=4, seq_len=256), "eval")
    lm = OrtLM(folder, provider="CPUExecutionProvider")
    ref = ModelScorer(model, blocks, progress=False).ppl()
    got = lm.ppl(blocks)
    print(f"\nWikiText-2 test 4x256, pruned SmolLM2 fp32: torch PPL {ref:.4f}, ORT CPU PPL {got:.4f}")
    assert got == pytest.approx(ref, rel=1e-3)
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    ref_tokens = torch_greedy(model, prompt, 16)
    assert lm.greedy(prompt, 16) == ref_tokens
    assert genai_greedy(folder, prompt, 16) == upto_eos(ref_tokens, model.config.eos_token_id)
