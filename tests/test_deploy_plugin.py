"""rtk deploy / bench for folders that need rtk's vLLM plugin (RtkForCausalLM, or a standard architecture
with per_layer_config skips): the command says so, containers get an image with rtk installed, and a vLLM
without the plugin is a clear error before anything starts."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import tiny_rtk
from rtk.errors import RtkError
from test_deploy import _fails, no_start, rtk  # noqa: F401  (no_start is a fixture)

OVERRIDE = ["--hf-overrides", '{"architectures": ["RtkForCausalLM"]}']


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny exports: Qwen3 in the plugin format, Llama with attn.0 removed in both per_layer_config formats."""
    from rtk.export.safetensors import export_model
    from rtk.model.rewrite import apply_plan

    root = tmp_path_factory.mktemp("plugin-folders")
    q3, llama = tiny_rtk("qwen3", tie=False), tiny_rtk("llama")
    export_model(apply_plan(q3, ["attn.1", "mlp.2"]), None, root / "qwen3" / "model")
    export_model(apply_plan(llama, ["attn.0", "mlp.2"]), None, root / "noattn0" / "model")
    export_model(apply_plan(llama, ["attn.0", "mlp.2"]), None, root / "plc" / "model", layout="per-layer-config")
    return {"qwen3": root / "qwen3" / "model", "noattn0": root / "noattn0" / "model", "plc": root / "plc" / "model"}


def _argv(text: str) -> list[str]:
    return shlex.split(text.replace("\\\n", " "), comments=True)[1:]  # drop the env assignment


def test_command_names_the_plugin(folders):
    for kind in ("qwen3", "noattn0"):
        r = rtk("deploy", "vllm", folders[kind], "--device", "cpu")
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith(f"# {kind} needs rtk's vLLM plugin (RtkForCausalLM): pip install rtk-prune next to vLLM\n")
        argv = _argv(r.stdout)
        assert "--trust-remote-code" not in argv and "--hf-overrides" not in argv  # config: native transformers
    argv = _argv(rtk("deploy", "vllm", folders["plc"], "--device", "cpu").stdout)
    assert argv[-2:] == OVERRIDE  # LlamaForCausalLM + skips: stock vLLM would build the skipped modules


def test_containers_install_rtk(folders, tmp_path):
    from rtk import __version__
    from rtk.serve.deploy import PLUGIN_IMAGE, VLLM_IMAGE

    out = tmp_path / "c.yml"
    assert rtk("deploy", "vllm", folders["plc"], "--format", "compose", "-o", out).exit_code == 0
    text = out.read_text()
    assert f"# Needs rtk's vLLM plugin (RtkForCausalLM): image {PLUGIN_IMAGE} = {VLLM_IMAGE} + pip install rtk-prune" in text
    svc = yaml.safe_load(text)["services"]["vllm"]
    assert svc["image"] == PLUGIN_IMAGE == f"rtk-vllm-openai:v0.33.0-rtk{__version__}"
    assert svc["build"]["dockerfile_inline"] == f"FROM {VLLM_IMAGE}\nRUN pip install --no-cache-dir rtk-prune=={__version__}\n"
    assert svc["command"][-2:] == OVERRIDE
    r = rtk("deploy", "vllm", folders["qwen3"], "--format", "k8s", "--tensor-parallel", 2)
    assert r.exit_code == 0, r.output
    assert "build and push it first: printf 'FROM vllm/vllm-openai:v0.33.0\\nRUN pip install" in r.stdout
    (c,) = list(yaml.safe_load_all(r.stdout))[1]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == PLUGIN_IMAGE and "--trust-remote-code" not in c["args"]


def test_tensor_parallel_counts_only_present_attention(folders, tmp_path):
    _fails([folders["qwen3"], "--tensor-parallel", 3],
           f"Error: --tensor-parallel 3: must divide the 4 attention heads and the 2 KV heads of "
           f"{folders['qwen3']}/config.json; valid sizes: 1, 2, 4")
    assert rtk("deploy", "vllm", folders["qwen3"], "--tensor-parallel", 4).exit_code == 0  # KV heads replicated


def test_plugin_missing_is_one_line_before_starting(folders, monkeypatch, no_start, tmp_path):
    """`rtk deploy --run` and `rtk bench --backend vllm` check that this vLLM loads rtk's plugin."""
    import importlib.metadata

    from rtk.bench.run import BenchConfig, run_bench

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [e for e in real(**kw) if not e.value.startswith("rtk.")])
    import sys

    msg = (f"model: {folders['qwen3']}: needs rtk's vLLM plugin (RtkForCausalLM), and the vLLM of {sys.executable} "
           "does not have it (no rtk entry point in vllm.general_plugins): pip install rtk-prune next to vLLM")
    _fails([folders["qwen3"], "--run"], f"Error: {msg}")
    with pytest.raises(RtkError) as err:  # checked for every model before the first server starts
        run_bench(BenchConfig(baseline=str(folders["noattn0"]), candidates=[str(folders["qwen3"])], backend="vllm"),
                  tmp_path / "bench")
    assert err.value.message.startswith(f"model: {folders['noattn0']}: needs rtk's vLLM plugin (RtkForCausalLM), and")
    assert not (tmp_path / "bench").exists()
    monkeypatch.setattr(importlib.metadata, "entry_points", real)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    _fails([folders["plc"], "--run"], f"Error: model: {folders['plc']}: needs rtk's vLLM plugin (RtkForCausalLM), "
                                      "and VLLM_PLUGINS='lora_filesystem_resolver' leaves it out: add 'rtk' to "
                                      "VLLM_PLUGINS or unset it")


def test_no_vllm_path_is_refused_with_the_list(folders, tmp_path):
    cfg = json.loads((folders["noattn0"] / "config.json").read_text())
    bad = tmp_path / "gemma"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"")
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    _fails([bad], f"Error: model: {bad}/config.json: model_type 'gemma' with ['GemmaForCausalLM'] and per-layer skips: "
                  "neither stock vLLM nor rtk's vLLM plugin serves it (the plugin serves llama, mistral, qwen2, "
                  "qwen3, gemma3_text; stock vLLM serves rtk's nemotron-nas folders)")
    (bad / "config.json").write_text(json.dumps({**cfg, "per_layer_config": {"7": {"skip": ["mixer"]}}}))
    _fails([bad], f"Error: model: {bad}/config.json: per_layer_config['7'] must be a layer index below 4 with a skip "
                  "list of attention / mlp (got {'skip': ['mixer']})")
    (bad / "config.json").write_text(json.dumps({**cfg, "per_layer_config": {str(i): {"skip": ["attention"]}
                                                                             for i in range(4)}}))
    _fails([bad], f"Error: model: {bad}/config.json: no layer has attention; vLLM cannot serve this model")


def test_readme_image_line_is_the_generated_one():
    from conftest import REPO
    from rtk.serve.deploy import PLUGIN_DOCKERFILE, PLUGIN_IMAGE

    text = (REPO / "deploy" / "README.md").read_text()
    assert f"```dockerfile\n{PLUGIN_DOCKERFILE}```" in text and f"`{PLUGIN_IMAGE}`" in text
