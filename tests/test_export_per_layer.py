"""`rtk export --format per-layer-config` and the plugin format: a standard config whose per_layer_config
`skip` lists name the removed modules, checked against transformers' own parsing, loaded back by rtk."""
from __future__ import annotations

import json
import shlex

import torch
from click.testing import CliRunner

from conftest import tiny_rtk
from rtk.cli import main
from rtk.serve.flags import folder_flags
from test_export_safetensors import HETERO, probe, reload, tiny_folder


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_per_layer_config_export_then_plugin_reexport(tmp_path):
    from transformers import AutoConfig, Qwen3Config

    dense = tiny_folder(tmp_path / "dense", "qwen3", tie=False)
    (tmp_path / "plan.json").write_text(json.dumps({"removed_sublayers": HETERO, "model": "tiny-qwen3",
                                                    "model_path": str(dense)}))
    r = run_cli("export", dense, "--format", "per-layer-config", "--plan", tmp_path / "plan.json", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    a = tmp_path / "a"
    assert "rtk: wrote" in r.output and "(Qwen3ForCausalLM, float32" in r.output
    assert ("rtk: vLLM: Qwen3ForCausalLM + per_layer_config: no vLLM release reads per_layer_config yet; today rtk's "
            "vLLM plugin serves it: `pip install rtk-prune` next to vLLM and pass --hf-overrides "
            "'{\"architectures\": [\"RtkForCausalLM\"]}'") in r.output
    raw = json.loads((a / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3ForCausalLM"] and raw["model_type"] == "qwen3"
    assert raw["per_layer_config"] == {"1": {"skip": ["attention"]}, "2": {"skip": ["attention", "mlp"]},
                                       "3": {"skip": ["mlp"]}}
    cfg = AutoConfig.from_pretrained(a)  # transformers' heterogeneous-config parsing and validation
    assert type(cfg) is Qwen3Config and cfg.is_heterogeneous and cfg.per_layer_attributes == set()
    assert [cfg.per_layer_config[i].skip for i in range(4)] == [[], ["attention"], ["attention", "mlp"], ["mlp"]]
    assert cfg.to_dict()["per_layer_config"] == raw["per_layer_config"]  # the round trip is lossless
    original = tiny_rtk("qwen3", tie=False)
    want = probe(original, skip=HETERO)
    torch.testing.assert_close(probe(reload(a)), want, atol=1e-5, rtol=1e-5)  # trust_remote_code: modeling_rtk.py
    card_command = "vllm serve THIS_FOLDER " + shlex.join(folder_flags(a))  # the flags rtk deploy would use
    assert "--hf-overrides" in card_command and card_command + "\n" in (a / "README.md").read_text()
    # rtk reads the folder back (per_layer_config -> its own class) and re-exports it in the plugin format,
    # checked against model_path run with the skips
    r = run_cli("export", a, "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert "(RtkForCausalLM, float32" in r.output and "original model run with the removed sublayers skipped" in r.output
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert b["architectures"] == ["RtkForCausalLM"] and b["per_layer_config"] == raw["per_layer_config"]
    assert folder_flags(tmp_path / "b") == [] and "vllm serve THIS_FOLDER\n" in (tmp_path / "b" / "README.md").read_text()
    torch.testing.assert_close(probe(reload(tmp_path / "b")), want, atol=1e-5, rtol=1e-5)


def test_stock_transformers_does_not_read_skip_yet(tmp_path):
    """What the README says: transformers 5.19's LlamaForCausalLM builds every module whatever `skip` says, so
    without trust_remote_code the removed modules come back random (reported as missing weights). When
    transformers' modeling code reads per_layer_config this test fails, and the README must change."""
    from transformers import AutoModelForCausalLM

    from rtk.export.safetensors import export_model
    from rtk.model.rewrite import apply_plan

    original = tiny_rtk("llama")
    export_model(apply_plan(original, ["attn.0", "mlp.2"]), None, tmp_path / "p", original=original,
                 layout="per-layer-config")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert {k for k in info["missing_keys"] if ".layers." in k} == {
        f"model.layers.0.{m}" for m in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight", "self_attn.o_proj.weight")} | {
        f"model.layers.2.{m}" for m in ("post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                        "mlp.up_proj.weight", "mlp.down_proj.weight")}
