"""`rtk quantize --scheme ort-int8 | ort-int8-block | ort-int4-block` on tiny ONNX exports (a pruned Llama with a
removed attention, a pruned Gemma 3): quantized, reloaded, run by ONNX Runtime and onnxruntime-genai within the
tolerance; projection kinds kept float (named, and the accuracy-aware search); bad input one line each; the real
SmolLM2 export (e2e). The tests that need the exports are marked onnx; the scheme checks run in the fast set."""
from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import rtk
from conftest import save_native, tiny_rtk
from rtk.cli import main
from rtk.errors import RtkError
from rtk.export.onnx import export_onnx, torch_greedy
from rtk.export.onnx_runtime import OrtLM
from rtk.export.safetensors import export_model
from rtk.model.rewrite import apply_plan
from rtk.plan import write_plan
from rtk.quantize.ort import RECORD, io_signature
from rtk.quantize.verify import MAX_MEAN_LOGPROB_DIFF, MAX_PPL_INCREASE, check
from test_export_onnx import PRUNE, genai_greedy, tiny_tokenizer, upto_eos

CASES = ["pruned-llama", "gemma3-pruned", "pruned-llama-int8-block", "gemma3-pruned-int4-block"]
SCHEME = {"pruned-llama": "ort-int8", "gemma3-pruned": "ort-int8", "pruned-llama-int8-block": "ort-int8-block",
          "gemma3-pruned-int4-block": "ort-int4-block"}


def cli(*args):
    return CliRunner().invoke(main, ["quantize", *map(str, args)])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{case: (onnx folder, quantized folder, torch model)}: the Llama quantized by the CLI, the Gemma 3 by the API."""
    root = tmp_path_factory.mktemp("quantize")
    words = random.Random(0)
    (root / "text.txt").write_text(" ".join(f"w{words.randrange(3, 128)}" for _ in range(3000)))
    out = {}
    llama = apply_plan(tiny_rtk("llama", layers=4, tie=False, seed=3), PRUNE)  # untied: the head is int8 too
    save_native(llama, tiny_tokenizer(), root / "llama-src")
    write_plan(root / "llama-src" / "plan.json", {"removed_sublayers": PRUNE, "model": "tiny"})
    export_onnx(str(root / "llama-src"), root / "llama-onnx")
    assert (root / "llama-onnx" / "plan.json").read_bytes() == (root / "llama-src" / "plan.json").read_bytes()
    res = cli(root / "llama-onnx", "--scheme", "ort-int8", "-o", root / "llama-int8", "--text", root / "text.txt",
              "--ppl-samples", 4, "--ppl-seq-len", 48)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-2].endswith("llama-int8 (ort-int8: 18 of 18 weight MatMuls int8)")
    assert res.output.splitlines()[-1].startswith("rtk: verified: PPL "), res.output
    out["pruned-llama"] = (root / "llama-onnx", root / "llama-int8", llama)
    gemma = tiny_rtk("gemma3", layers=4)  # tied: the head stays float32
    export_model(apply_plan(gemma, PRUNE), tiny_tokenizer(bos=True), root / "gemma-src", original=gemma)
    export_onnx(str(root / "gemma-src"), root / "gemma-onnx")
    q = rtk.quantize(root / "gemma-onnx", scheme="ort-int8", out=root / "gemma-int8", text=str(root / "text.txt"),
                     samples=4, seq_len=48, echo=None)
    assert q.out == root / "gemma-int8" and q.record["quantized_matmuls"] == q.record["weight_matmuls"] == 17
    assert (q.ppl_quantized, q.mean_abs_logprob_diff) == (q.record["verification"]["ppl_quantized"],
                                                          q.record["verification"]["prefill"]["mean_abs_logprob_diff"])
    out["gemma3-pruned"] = (root / "gemma-onnx", root / "gemma-int8", apply_plan(gemma, PRUNE))
    res = cli(root / "llama-onnx", "--scheme", "ort-int8-block", "-o", root / "llama-int8-block", "--text",
              root / "text.txt", "--ppl-samples", 4, "--ppl-seq-len", 48)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-2].endswith("llama-int8-block (ort-int8-block: 18 of 18 weight MatMuls int8)")
    out["pruned-llama-int8-block"] = (root / "llama-onnx", root / "llama-int8-block", llama)
    q = rtk.quantize(root / "gemma-onnx", scheme="ort-int4-block", out=root / "gemma-int4-block",
                     text=str(root / "text.txt"), samples=4, seq_len=48, echo=None)
    assert q.record["quantized_matmuls"] == 17 and q.record["settings"]["bits"] == 4
    out["gemma3-pruned-int4-block"] = (root / "gemma-onnx", root / "gemma-int4-block", apply_plan(gemma, PRUNE))
    return out


@pytest.mark.onnx
@pytest.mark.parametrize("case", CASES)
def test_the_folder_is_int8_with_the_kv_cache_and_files_kept(quantized, case):
    src, dst, _ = quantized[case]
    before, after = (onnx.load(str(d / "model.onnx")) for d in (src, dst))
    assert io_signature(after) == io_signature(before)  # the KV cache inputs / presents exactly as exported
    op = "MatMulInteger" if SCHEME[case] == "ort-int8" else "MatMulNBits"
    assert any(n.op_type == op for n in after.graph.node)
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in after.graph.initializer}
                   for n in after.graph.node)  # no weight MatMul left float
    rec = json.loads((dst / RECORD).read_text())
    assert rec["scheme"] == SCHEME[case] and rec["float_kinds"] == [] and rec["float_matmuls"] == 0
    assert rec["weights_after"]["INT8" if op == "MatMulInteger" else "UINT8"]["elements"] > 0
    size = {k: sum(r["bytes"] for r in rec[k].values()) for k in ("weights_before", "weights_after")}
    assert size["weights_after"] < size["weights_before"]
    assert {p.name for p in dst.iterdir()} == {p.name for p in src.iterdir()} | {RECORD, "README.md"}
    kept = ["config.json", "genai_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for f in kept + (["plan.json"] if case == "pruned-llama" else []):
        assert (dst / f).read_bytes() == (src / f).read_bytes(), f
    card = (dst / "README.md").read_text()
    assert "## Quantization" in card and rec["tool"] in card and rec["weights"] in card
    total = sum(r["elements"] for r in rec["weights_after"].values())
    assert f"of {total:,} stored elements are bytes of integer weights" in card
    assert f"PPL {rec['verification']['ppl_unquantized']:.4f} -> {rec['verification']['ppl_quantized']:.4f}" in card
    v = rec["verification"]
    assert v["ppl_increase"] <= MAX_PPL_INCREASE and v["prefill"]["tokens"] == 4 * 47 and v["decode"]["tokens"] == 8
    assert 0 < v["prefill"]["mean_abs_logprob_diff"] <= MAX_MEAN_LOGPROB_DIFF
    assert sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(".")) == []  # no temp folder left


@pytest.mark.onnx
@pytest.mark.parametrize("case", CASES)
def test_ort_and_genai_run_the_quantized_folder_within_tolerance(quantized, case):
    _, dst, model = quantized[case]
    lm = OrtLM(dst, provider="CPUExecutionProvider")
    seqs = [list(range(3, 40)), [5, 9, 100, 7, 64, 3, 3, 80]]
    got = lm.token_logprobs(seqs)
    for s, g in zip(seqs, got):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s]), use_cache=False).logits[0, :-1], -1)
        ref = ref.gather(-1, torch.tensor(s[1:])[:, None])[:, 0].numpy()
        d = np.abs(np.asarray(g) - ref)
        assert 0 < d.mean() <= MAX_MEAN_LOGPROB_DIFF  # quantizing changes the numbers, within the tolerance
    from rtk.bench.backends import OnnxBackend

    assert OnnxBackend(str(dst)).token_logprobs(seqs) == got  # rtk bench --backend onnx takes the folder as it is
    prompt = [1, 17, 40, 99, 23]
    tokens = lm.greedy(prompt, 8)
    if SCHEME[case] != "ort-int4-block":  # int8 moves log-probs by ~2e-3 nats here: no argmax flips
        assert tokens == torch_greedy(model, prompt, 8)
    assert genai_greedy(dst, prompt, 8) == upto_eos(tokens, model.config.eos_token_id)


def test_check_names_every_number_over_the_tolerance():
    ok = {"ppl_unquantized": 10.0, "ppl_quantized": 10.2, "ppl_increase": 0.02,
          "prefill": {"mean_abs_logprob_diff": 0.03}, "decode": {"mean_abs_logprob_diff": 0.04}}
    check(ok, "-o x")
    bad = {**ok, "ppl_quantized": 11.0, "ppl_increase": 0.1, "decode": {"mean_abs_logprob_diff": float("nan")}}
    with pytest.raises(RtkError, match=r"^-o x: the quantized model differs from the unquantized one beyond the "
                                       r"tolerance: PPL 10 -> 11 \(\+10.00%; tolerance \+5%\); decode: mean "
                                       r"\|log-prob difference\| nan nats per token \(tolerance 0.1\)$"):
        check(bad, "-o x")


# ---- bad input: one line, exit != 0, nothing written -------------------------------------------------------------

def nothing_beside(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith("."))


@pytest.mark.onnx
def test_over_the_tolerance_writes_nothing(quantized, tmp_path, monkeypatch):
    import rtk.quantize.verify as verify

    src = quantized["pruned-llama"][0]
    monkeypatch.setattr(verify, "MAX_MEAN_LOGPROB_DIFF", 0.0)
    res = cli(src, "--scheme", "ort-int8", "-o", tmp_path / "out", "--text", src.parent / "text.txt",
              "--ppl-samples", 2, "--ppl-seq-len", 16)
    assert res.exit_code == 1
    assert res.output.splitlines()[-1].startswith(f"Error: -o {tmp_path / 'out'}: the quantized model differs from "
                                                  "the unquantized one beyond the tolerance: prefill: mean |log-prob")
    assert nothing_beside(tmp_path / "out") == []


def test_unknown_scheme(tmp_path):
    res = cli(tmp_path, "--scheme", "int3", "-o", tmp_path / "out")
    assert res.exit_code == 2
    assert res.output.splitlines()[-1] == ("Error: Invalid value for '--scheme': unknown scheme 'int3'; rtk quantize "
                                           "knows: ort-int8, ort-int8-block, ort-int4-block, w8a8, w4a16, fp8")
    assert not (tmp_path / "out").exists()


def test_a_scheme_this_install_cannot_serve_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RTK_LC_PYTHON", str(tmp_path / "no-python"))  # no llm-compressor environment
    for scheme, why in (("fp8", "FP8 weights are served by GPUs (vLLM's FP8 kernels) and this machine has none"),
                        ("w8a8", f"RTK_LC_PYTHON={tmp_path / 'no-python'} is no file")):
        res = cli(tmp_path / "no-such-folder", "--scheme", scheme, "-o", tmp_path / "out")  # the folder: never read
        assert res.exit_code == 1
        line = res.output.strip()
        assert "\n" not in line and line.startswith(f"Error: --scheme {scheme} (") and why in line
        assert line.endswith("schemes this install serves: ort-int8, ort-int8-block, ort-int4-block")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    res = cli(tmp_path / "no-such-folder", "--scheme", "ort-int8", "-o", tmp_path / "out")
    assert (res.exit_code, res.output) == (1, "Error: --scheme ort-int8 (an ONNX graph with int8 weights and dynamic "
                                              "uint8 activations per tensor, for ONNX Runtime): this install has no "
                                              "onnxruntime / "
                                              "onnx (pip install 'rtk-prune[onnx]'); schemes this install serves: "
                                              "none\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.onnx
def test_folders_ort_int8_cannot_quantize(quantized, tmp_path):
    src, dst, _ = quantized["pruned-llama"]
    cases = [(dst, f"Error: MODEL_DIR: {dst} is quantized already (quantize.json: scheme ort-int8); quantize the "
                   "unquantized export"),
             (src.parent / "llama-src", f"Error: MODEL_DIR: {src.parent / 'llama-src'} is not an rtk ONNX export (no "
                                        "model.onnx beside a config.json with rtk_onnx); --scheme ort-int8 quantizes "
                                        "what `rtk export MODEL --format onnx -o DIR` writes"),
             (tmp_path / "nope", f"Error: MODEL_DIR: {tmp_path / 'nope'}: no such folder")]
    stripped = tmp_path / "stripped"  # a quantized graph without its record
    stripped.mkdir()
    for f in dst.iterdir():
        if f.name != RECORD:
            (stripped / f.name).write_bytes(f.read_bytes())
    cases.append((stripped, f"Error: MODEL_DIR: {stripped}: model.onnx is quantized already (it holds "
                            "DynamicQuantizeLinear, MatMulInteger); quantize the unquantized export"))
    for folder, line in cases:
        res = cli(folder, "--scheme", "ort-int8", "-o", tmp_path / "out")
        assert (res.exit_code, res.output) == (1, line + "\n")
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    res = cli(src, "--scheme", "ort-int8", "-o", tmp_path / "out")
    assert res.output == (f"Error: -o {tmp_path / 'out'}: already exists; choose a new folder (rtk never overwrites "
                          "a quantized folder)\n")
    assert list((tmp_path / "out").iterdir()) == []


# ---- projection kinds kept float ----------------------------------------------------------------------------------

@pytest.mark.onnx
def test_named_kinds_stay_float(quantized, tmp_path):
    from rtk.quantize.ort import weight_matmuls

    src = quantized["pruned-llama"][0]
    kinds = weight_matmuls(onnx.load(str(src / "model.onnx"), load_external_data=False))
    assert sorted(set(kinds.values())) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                           "up_proj", "v_proj"]  # the dynamo export's module names
    res = cli(src, "--scheme", "ort-int8-block", "-o", tmp_path / "out", "--keep-float", "down_proj,lm_head",
              "--text", src.parent / "text.txt", "--ppl-samples", 2, "--ppl-seq-len", 32)
    assert res.exit_code == 0, res.output
    floats = [n for n, k in kinds.items() if k in ("down_proj", "lm_head")]
    assert res.output.splitlines()[-2].endswith(f"(ort-int8-block: {len(kinds) - len(floats)} of {len(kinds)} weight "
                                                "MatMuls int8; float32: down_proj, lm_head)")
    after = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    still = {n.name for n in after.graph.node if n.op_type == "MatMul"}
    assert set(floats) <= still and not set(kinds) - set(floats) & still
    rec = json.loads((tmp_path / "out" / RECORD).read_text())
    assert (rec["float_kinds"], rec["float_matmuls"]) == (["down_proj", "lm_head"], len(floats))
    assert "keep_float_search" not in rec
    assert "left float32 (`--keep-float`): 4 MatMuls of kinds down_proj, lm_head" in (tmp_path / "out" /
                                                                                   "README.md").read_text()


class ScriptedTrials:
    """rtk.quantize.ort.Trials with scripted errors: a kind quantized adds its error; passes at <= 0.1."""

    def __init__(self, error: dict):
        from rtk.quantize.ort import Trials

        self.error, self.kinds, self.scheme, self.tried = error, {f"n{i}": k for i, k in enumerate(error)}, "s", []
        self.note = Trials.note.__get__(self)
        self.echo = lambda s: None

    def run(self, float_kinds):
        d = sum(e for k, e in self.error.items() if k not in float_kinds)
        stats = {"ppl_increase": d / 10, "prefill": {"mean_abs_logprob_diff": d},
                 "decode": {"mean_abs_logprob_diff": d}}
        return stats, d <= 0.1, 0.0


def test_auto_keeps_the_worst_kinds_float_until_the_comparison_passes():
    from rtk.quantize.ort import auto_float

    t = ScriptedTrials({"q_proj": 0.02, "down_proj": 0.5, "up_proj": 0.2, "v_proj": 0.05, "o_proj": 0.01})
    assert auto_float(t) == ["down_proj", "up_proj"]  # 0.08 left: within 0.1; v_proj (0.05) alone would not do
    assert [x["why"] for x in t.tried] == (["everything quantized"] + [f"{k} alone quantized" for k in
                                           sorted(t.error)] + ["worst kinds float"] * 2)
    assert [x["passes"] for x in t.tried] == [False, False, True, True, False, True, False, True]
    assert auto_float(ScriptedTrials({"q_proj": 0.02, "o_proj": 0.01})) == []  # passes as it is: one try
    with pytest.raises(RtkError, match=r"^--keep-float auto: no set of projection kinds left float brings s within "
                                       r"the tolerance \(the least harmful kind, q_proj, quantized alone: PPL "
                                       r"\+2.00%, 0.200 nats per token\); nothing written$"):
        auto_float(ScriptedTrials({"q_proj": 0.2, "up_proj": 0.3}))


@pytest.mark.onnx
def test_auto_on_a_model_within_the_tolerance_keeps_nothing_float(quantized, tmp_path):
    src = quantized["pruned-llama"][0]
    q = rtk.quantize(src, scheme="ort-int8", out=tmp_path / "out", keep_float="auto", text=str(src.parent / "text.txt"),
                     samples=2, seq_len=32, echo=None)
    assert q.record["float_kinds"] == [] and q.record["quantized_matmuls"] == q.record["weight_matmuls"]
    assert [x["why"] for x in q.record["keep_float_search"]] == ["everything quantized"]
    assert nothing_beside(tmp_path / "out") == ["out"]  # no scratch folder left


@pytest.mark.onnx
def test_bad_keep_float(quantized, tmp_path):
    src = quantized["pruned-llama"][0]
    res = cli(src, "--scheme", "ort-int8", "-o", tmp_path / "out", "--keep-float", "down_proj,mlp")
    assert (res.exit_code, res.output) == (1, "Error: --keep-float: mlp names no MatMul of this export; its projection "
                                              "kinds: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                                              "v_proj (or auto)\n")
    res = cli(src, "--scheme", "ort-int8-block", "-o", tmp_path / "out", "--keep-float",
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")
    assert (res.exit_code, res.output) == (1, "Error: --keep-float: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                              "down_proj, lm_head leaves every weight MatMul float32, nothing to "
                                              "quantize\n")
    res = cli(src, "--scheme", "w8a8", "-o", tmp_path / "out", "--keep-float", "down_proj")
    assert res.exit_code == 1 and res.output.startswith("Error: ")
    assert nothing_beside(tmp_path / "out") == []


def test_keep_float_is_for_onnx_runtime_schemes(tmp_path, monkeypatch):
    monkeypatch.setattr("rtk.quantize.api.quantizer", lambda name: pytest.fail("no work before the check"))
    with pytest.raises(RtkError, match=r"^--keep-float: --scheme w8a8 takes no projection kinds to keep float \(ONNX "
                                       r"Runtime's schemes do: ort-int8, ort-int8-block, ort-int4-block; "
                                       r"llm-compressor keeps lm_head unquantized\)$"):
        rtk.quantize(tmp_path, scheme="w8a8", out=tmp_path / "out", keep_float="down_proj")


# ---- e2e: the real SmolLM2 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dense_onnx(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-dense-onnx") / "onnx"
    export_onnx(str(smollm2_dir), out)
    return out


@pytest.mark.e2e
@pytest.mark.onnx
def test_smollm2_int8_blocks_within_the_default_tolerance_where_per_tensor_int8_is_not(smollm2_dense_onnx, tmp_path):
    """The real SmolLM2's export: ort-int8-block passes rtk's default tolerance (measured 0.075 nats per token, PPL
    +0.3%); ort-int8 fails it (1.06 nats, +75%) and writes nothing, naming --keep-float auto and ort-int8-block."""
    src = smollm2_dense_onnx
    q = rtk.quantize(src, scheme="ort-int8-block", out=tmp_path / "block", echo=None)
    v = q.record["verification"]
    assert q.record["quantized_matmuls"] == q.record["weight_matmuls"] > 100
    assert v["ppl_increase"] <= MAX_PPL_INCREASE and v["prefill"]["mean_abs_logprob_diff"] <= MAX_MEAN_LOGPROB_DIFF
    assert OrtLM(tmp_path / "block").greedy([1, 504, 3458, 314], 4)  # runs through the KV cache
    res = cli(src, "--scheme", "ort-int8", "-o", tmp_path / "dynamic")
    assert res.exit_code == 1
    line = res.output.splitlines()[-1]
    assert "beyond the tolerance" in line and line.endswith(
        "(--keep-float auto leaves the worst projection kinds float32; --scheme ort-int8-block scales activations "
        "per block)")
    assert nothing_beside(tmp_path / "dynamic") == []
