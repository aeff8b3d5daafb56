"""`rtk export --format safetensors` and the export `rtk prune` writes: tiny Llama / Mistral / Qwen2 / Qwen3 /
Gemma 3."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import tiny_hf, tiny_rtk
from rtk.cli import main
from rtk.errors import RtkError
from rtk.export import FORMATS
from rtk.export.configs import vllm_blocker
from rtk.export.safetensors import export_model
from rtk.model.rewrite import apply_plan

# layer 1 keeps only its MLP, layer 2 loses both, layer 3 keeps only attention (the last layer's MLP goes)
HETERO = ["attn.1", "attn.2", "mlp.2", "mlp.3"]
LAYERS = ["layer.1", "layer.3"]


def tiny_tokenizer(folder: Path, bos: bool = False) -> None:
    """A character-level tokenizer (ids < 128) saved into `folder`; `bos`: it adds <s> before the text (Gemma)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            add_bos_token=bos).save_pretrained(folder)


def tiny_folder(path: Path, arch: str = "llama", tie: bool = True) -> Path:
    tiny_hf(arch, tie=tie).save_pretrained(path)
    tiny_tokenizer(path, bos=arch.startswith("gemma3"))
    return path


def data_bytes(folder: Path) -> int:
    """Tensor bytes in the folder's safetensors files (file size minus header)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = struct.unpack("<Q", fh.read(8))[0]
        total += f.stat().st_size - 8 - header
    return total


@torch.no_grad()
def probe(model, skip=()):
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(7))
    kw = {"skip": frozenset(skip)} if skip else {}
    return model(input_ids=ids, use_cache=False, **kw).logits.float()


def reload(folder: Path):
    from transformers import AutoModelForCausalLM

    remote = (folder / "modeling_rtk.py").is_file()
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=remote).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("plan", [HETERO, LAYERS], ids=["hetero", "layers"])
def test_prune_export_reload_equal_logits(tmp_path, arch, tie, plan):
    original = tiny_rtk(arch, tie=tie)
    pruned = apply_plan(original, plan)
    s = export_model(pruned, None, tmp_path / "out", original=original)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie
    if plan is HETERO and arch in ("qwen3", "gemma3"):  # DeciLM has no q/k norms, no sandwich norms: the plugin
        assert s["layout"] == "plugin" and s["vllm_plugin"] and (out / "modeling_rtk.py").is_file()
        assert cfg["architectures"] == ["RtkForCausalLM"] and cfg["model_type"] == {"qwen3": "qwen3"}.get(
            arch, "gemma3_text")
        assert cfg["head_dim"] == 24 and cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
        assert cfg["per_layer_config"] == {"1": {"skip": ["attention"]}, "2": {"skip": ["attention", "mlp"]},
                                           "3": {"skip": ["mlp"]}}
    elif plan is HETERO:
        assert s["layout"] == "native" and (out / "modeling_rtk.py").is_file()
        assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
        assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert cfg["qkv_bias"] is (arch == "qwen2") and cfg["attention_bias"] is False
        assert [(b["attention"]["no_op"], b["attention"]["n_heads_in_group"], b["ffn"]["no_op"],
                 b["ffn"]["intermediate_size"]) for b in cfg["block_configs"]] == [
            (False, 2, False, 96), (True, None, False, 96), (True, None, True, None), (False, 2, True, None)]
        assert not any("ffn_mult" in b["ffn"] for b in cfg["block_configs"])
    else:
        want = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
        assert s["layout"] == "standard" and cfg["architectures"] == [want]
        assert cfg["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch)
        assert cfg["num_hidden_layers"] == 2 and "auto_map" not in cfg
        assert not (out / "modeling_rtk.py").exists()
    assert len(s["verification"]) == 2
    got = probe(reload(out))
    torch.testing.assert_close(got, probe(original, skip=s["removed_sublayers"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, probe(pruned), atol=1e-5, rtol=1e-5)


def test_gemma3_exports_keep_each_layers_type_and_settings(tmp_path):
    """Gemma 3 with whole layers gone: a standard Gemma3ForCausalLM folder whose layer_types are those of the
    layers kept (sliding, global, global of 4), with the window, RoPE bases, query scale and norms as before; with
    sublayers gone: rtk's plugin format, every layer's type kept; both reload to the pruned model's logits on
    sequences past the window. A plan naming a layer past the last is one line, nothing written."""
    from conftest import GEMMA3_WINDOW
    from transformers import Gemma3ForCausalLM

    dense = tiny_folder(tmp_path / "dense", "gemma3")
    original = tiny_rtk("gemma3")
    (tmp_path / "layers.json").write_text(json.dumps({"removed_sublayers": ["layer.2"]}))
    r = run_cli("export", dense, "--plan", tmp_path / "layers.json", "-o", tmp_path / "std")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "std" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["num_hidden_layers"] == 3 and "auto_map" not in cfg
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert (cfg["sliding_window"], cfg["query_pre_attn_scalar"], cfg["hidden_activation"]) == (
        GEMMA3_WINDOW, 32, "gelu_pytorch_tanh")
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    std = Gemma3ForCausalLM.from_pretrained(tmp_path / "std", dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 3 * GEMMA3_WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original(ids, skip=frozenset({"attn.2", "mlp.2"})).logits
        torch.testing.assert_close(std(ids).logits, want, atol=1e-5, rtol=1e-5)

    (tmp_path / "sub.json").write_text(json.dumps({"removed_sublayers": ["attn.0", "mlp.1", "attn.3"]}))
    r = run_cli("export", dense, "--plan", tmp_path / "sub.json", "-o", tmp_path / "plugin")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "plugin" / "config.json").read_text())
    assert cfg["architectures"] == ["RtkForCausalLM"] and cfg["num_hidden_layers"] == 4
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert cfg["per_layer_config"] == {"0": {"skip": ["attention"]}, "1": {"skip": ["mlp"]},
                                       "3": {"skip": ["attention"]}}
    with torch.no_grad():
        got = reload(tmp_path / "plugin")(ids).logits
        torch.testing.assert_close(got, original(ids, skip=frozenset({"attn.0", "mlp.1", "attn.3"})).logits,
                                   atol=1e-5, rtol=1e-5)
    # rtk reads its own plugin folder back (re-export) and keeps the plan
    r = run_cli("export", tmp_path / "plugin", "-o", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["per_layer_config"] == cfg["per_layer_config"]

    (tmp_path / "past.json").write_text(json.dumps({"removed_sublayers": ["attn.1", "layer.4"]}))
    r = run_cli("export", dense, "--plan", tmp_path / "past.json", "-o", tmp_path / "out")
    assert r.exit_code == 1 and last_line(r) == "Error: plan: 'attn.4' names layer 4, but the model has 4 layers"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "dense", "layers.json", "past.json", "plugin",
                                                          "std", "sub.json"]


def test_llama_attention_bias_maps_to_qkv_and_o_bias(tmp_path):
    """Llama's attention_bias is a bias on q, k, v and o: DeciLM says so with qkv_bias + attention_bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rtk.model.load import from_hf

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).eval()
    for layer in hf.model.layers:
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            torch.nn.init.normal_(p.bias, std=0.5)
    original = from_hf(hf).eval()
    torch.testing.assert_close(probe(original), probe(hf), atol=1e-5, rtol=1e-5)
    export_model(apply_plan(original, ["mlp.1"]), None, tmp_path / "n", original=original)
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())
    assert cfg["qkv_bias"] is True and cfg["attention_bias"] is True
    export_model(apply_plan(original, ["layer.1"]), None, tmp_path / "s", original=original)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["attention_bias"] is True


@pytest.mark.parametrize("dtype,width", [("float32", 4), ("bfloat16", 2)])
def test_weight_bytes_shrink_with_parameters(tmp_path, dtype, width):
    original = tiny_rtk("llama", layers=6, tie=False)
    dense = export_model(original, None, tmp_path / "dense", dtype=dtype)
    pruned = export_model(apply_plan(original, ["attn.1", "mlp.3", "layer.4"]), None, tmp_path / "p",
                          dtype=dtype, original=original)
    assert data_bytes(tmp_path / "dense") == width * dense["params"]
    assert data_bytes(tmp_path / "p") == width * pruned["params"]
    assert pruned["params"] < dense["params"]
    ratio = pruned["weight_bytes"] / dense["weight_bytes"]
    assert ratio == pytest.approx(pruned["params"] / dense["params"], abs=0.02)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == dtype


def test_verification_mismatch_fails_and_leaves_nothing(tmp_path, monkeypatch):
    import rtk.export.safetensors as st

    real = st.write_shards

    def corrupt(out, specs, tensor, shard_bytes):  # one weight written wrong
        bad = "model.layers.0.mlp.down_proj.weight"
        return real(out, specs, lambda k: tensor(k) + 0.5 if k == bad else tensor(k), shard_bytes)

    monkeypatch.setattr(st, "write_shards", corrupt)
    original = tiny_rtk("llama")
    with pytest.raises(RtkError, match=r"export verification failed: logits of the reloaded model differ from "
                                       r"the in-memory pruned model by [0-9.e+-]+ \(tolerance [0-9.e+-]+\)"):
        export_model(apply_plan(original, ["attn.2"]), None, tmp_path / "out", original=original)
    assert list(tmp_path.iterdir()) == []


def test_first_sublayer_mlp_goes_to_the_plugin_format(tmp_path):
    """Stock vLLM's DeciLM crashes when an MLP comes before any attention: such plans (attn.0 removed) are
    written in rtk's vLLM plugin format; a whole layer 0 removed is still a standard checkpoint."""
    from transformers import AutoConfig, LlamaConfig

    original = tiny_rtk("llama")
    for plan, first in ((["attn.0"], "mlp.0"), (["layer.0", "attn.1"], "mlp.1")):
        pruned = apply_plan(original, plan)
        assert vllm_blocker(pruned.config) == first
        s = export_model(pruned, None, tmp_path / first, original=original)
        assert s["layout"] == "plugin" and s["architecture"] == "RtkForCausalLM" and s["vllm_plugin"]
        assert s["vllm"] == ("served by rtk's vLLM plugin (RtkForCausalLM): `pip install rtk-prune` next to vLLM 0.32 "
                             "(or build the image in deploy/README.md)")
        cfg = AutoConfig.from_pretrained(tmp_path / first)  # transformers' own per_layer_config parsing
        assert type(cfg) is LlamaConfig and cfg.is_heterogeneous
        skips = [cfg.per_layer_config[i].skip for i in range(4)]
        assert skips == ([["attention"], [], [], []] if first == "mlp.0" else [["attention", "mlp"], ["attention"], [], []])
        torch.testing.assert_close(probe(reload(tmp_path / first)), probe(original, skip=s["removed_sublayers"]),
                                   atol=1e-5, rtol=1e-5)
        card = (tmp_path / first / "README.md").read_text()
        assert "pip install rtk-prune  # next to vLLM" in card and "trust_remote_code=True" in card
    s = export_model(apply_plan(original, ["layer.0"]), None, tmp_path / "l0", original=original)
    assert s["layout"] == "standard" and not s["vllm_plugin"]


def test_no_vllm_format_is_refused_with_the_list(tmp_path):
    """A nemotron-nas model rtk did not make (no base architecture) whose first sublayer is an MLP: neither
    stock vLLM's DeciLM nor rtk's plugin can serve it, and nothing is written."""
    from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM

    cfg = tiny_rtk("llama").config.to_dict()
    cfg.pop("rtk_base_model_type")
    torch.manual_seed(0)
    foreign = RtkDeciLMForCausalLM(RtkDeciConfig(**cfg)).eval()
    with pytest.raises(RtkError) as err:
        export_model(apply_plan(foreign, ["attn.0"]), None, tmp_path / "v")
    assert err.value.message == (
        "plan: no vLLM format serves this model: stock vLLM 0.32's DeciLM cannot (its first remaining sublayer is "
        "mlp.0 (an MLP before any attention), and vLLM's DeciLM layer crashes there), and rtk's vLLM plugin serves "
        "standard llama, mistral, qwen2, qwen3, gemma3_text configs whose removed modules are listed per layer, which "
        "this model "
        "(base model_type 'none') is not")
    with pytest.raises(RtkError, match="--format per-layer-config: the model \\(base model_type 'none'\\) is not"):
        export_model(apply_plan(foreign, ["attn.1"]), None, tmp_path / "v", layout="per-layer-config")
    assert list(tmp_path.iterdir()) == []
    # what it can serve, it still writes: attention first -> DeciLM
    assert export_model(apply_plan(foreign, ["attn.1"]), None, tmp_path / "d")["layout"] == "native"


def last_line(result) -> str:
    """The error line (transformers' loading progress bars may precede it on stderr)."""
    return result.output.splitlines()[-1]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_export_dense_with_plan_then_reexport(tmp_path):
    dense = tiny_folder(tmp_path / "dense", "qwen2", tie=False)
    plan = {"removed_sublayers": HETERO, "model": "tiny-qwen2", "model_path": str(dense)}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = run_cli("export", dense, "--format", "safetensors", "--plan", tmp_path / "plan.json", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "rtk: wrote" in r.output and "DeciLMForCausalLM" in r.output
    assert "vs the original model run with the removed sublayers skipped" in r.output
    a = tmp_path / "a"
    assert {"config.json", "model.safetensors", "modeling_rtk.py", "tokenizer.json", "generation_config.json",
            "plan.json", "README.md"} <= {p.name for p in a.iterdir()}
    card = (a / "README.md").read_text()
    assert "tiny-qwen2" in card and "| 2 | MLP + attention |" in card and "trust_remote_code=True" in card
    assert "vllm serve THIS_FOLDER --trust-remote-code\n" in card  # rtk.serve.flags.folder_flags of the written folder
    # re-export OUT/model-like folder to bfloat16: checked against model_path run with skips
    r = run_cli("export", a, "-o", tmp_path / "b", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert "bfloat16" in r.output and "original model run with the removed sublayers skipped" in r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    # a dense model exports as a standard checkpoint
    r = run_cli("export", dense, "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert "vllm serve THIS_FOLDER\n" in (tmp_path / "c" / "README.md").read_text()  # stock vLLM, no flag


def test_cli_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("export", tmp_path / "empty", "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert r.output == f"Error: model: {tmp_path / 'empty'}: folder has no config.json, so it is not a model folder\n"
    assert not (tmp_path / "out").exists()


def test_cli_plan_does_not_match_model(tmp_path):
    dense = tiny_folder(tmp_path / "dense")
    (tmp_path / "plan.json").write_text(json.dumps({"removed_sublayers": ["attn.1", "mlp.7"]}))
    r = run_cli("export", dense, "--plan", tmp_path / "plan.json", "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert last_line(r) == "Error: plan: 'mlp.7' names layer 7, but the model has 4 layers"
    (tmp_path / "plan.json").write_text(json.dumps({"removed": []}))
    r = run_cli("export", dense, "--plan", tmp_path / "plan.json", "-o", tmp_path / "out")
    assert last_line(r) == (f"Error: --plan {tmp_path / 'plan.json'}: has no 'removed_sublayers' list "
                            "(write it with rtk prune)")
    # a folder whose own plan.json disagrees with its config
    r = run_cli("export", dense, "--plan", tmp_path / "ok.json", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "cannot read it as JSON" in r.output
    export_model(apply_plan(tiny_rtk("llama"), ["attn.1"]), None, tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    (tmp_path / "m" / "plan.json").write_text(json.dumps({"removed_sublayers": ["attn.2"]}))
    r = run_cli("export", tmp_path / "m", "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert last_line(r) == (f"Error: {tmp_path / 'm' / 'plan.json'}: removed_sublayers ['attn.2'] do not match "
                            "the model's config.json, which lacks ['attn.1']")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "m", "plan.json"]


def test_cli_usage_errors(tmp_path):
    dense = tiny_folder(tmp_path / "dense")
    r = run_cli("export", dense, "-o", tmp_path / "out", "--dtype", "int8")
    assert r.exit_code == 2
    assert last_line(r) == "Error: Invalid value for '--dtype': 'int8' is not one of " \
                           "'float32', 'bfloat16', 'float16'."  # rtk.settings.DTYPE_NAMES, in its order
    r = run_cli("export", dense, "-o", tmp_path / "out", "--format", "gguf")
    assert r.exit_code == 2
    assert last_line(r) == ("Error: Invalid value for '--format': unknown format 'gguf'; "
                            f"rtk exports: {', '.join(FORMATS)}")
    (tmp_path / "out").mkdir()
    r = run_cli("export", dense, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert r.output == f"Error: -o {tmp_path / 'out'}: already exists; choose a new folder " \
                       "(rtk never overwrites an export)\n"


def test_prune_writes_model_through_export(tmp_path):
    dense = tiny_folder(tmp_path / "dense", "mistral")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text.upper())
    recipe = {"model": str(dense), "scoring": {"batch_size": 2},
              "data": {"calibration": {"source": str(tmp_path / "calib.txt"), "samples": 2, "seq_len": 32},
                       "evaluation": {"source": str(tmp_path / "eval.txt"), "samples": 2, "seq_len": 32}},
              "search": {"target": {"sublayers": 3}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = run_cli("prune", tmp_path / "r.yaml", "-o", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    model = tmp_path / "run" / "model"
    plan = json.loads((model / "plan.json").read_text())
    assert plan == json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (model / "recipe.yaml").is_file() and (model / "tokenizer.json").is_file()
    card = (model / "README.md").read_text()
    assert f"{plan['params_total']:,} before -> {plan['params_after']:,} after" in card
    assert f"| evaluation | {plan['eval']['ppl_base']:.3f} | {plan['eval']['ppl_final']:.3f} | eval.txt, 2 blocks x 32 " \
        "tokens (62 predicted) |" in card
    assert str(tmp_path) not in card  # published with the model: no path of this machine
    heads = [x for x in card.splitlines() if x.startswith("## ")]
    assert heads == ["## Deployment", "## Creation", "## Evaluation", "## Inference performance",
                     "## How the numbers were measured"]
    assert "source: calib.txt" in card and "rtk prune recipe.yaml -o OUT" in card and "model: dense" in card
    original = tiny_rtk("mistral")
    torch.testing.assert_close(probe(reload(model)), probe(original, skip=plan["removed_sublayers"]),
                               atol=1e-5, rtol=1e-5)
