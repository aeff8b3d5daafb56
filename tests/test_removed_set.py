"""One removed set: RemovedSet and its torch-free codec (rtk.model.sublayer) to and from plan.json's names,
block_configs, per_layer_config skip lists and the ONNX attention list; removed_set reads any config rtk writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, tiny_rtk
from rtk.errors import RtkError
from rtk.model.sublayer import BLOCK_PART, BLOCK_SIZE, KINDS, SKIP, RemovedSet, Sublayer, removed_set

LAYERS = 5
SETS = [[], ["attn.0"], ["mlp.4"], ["layer.2"], ["attn.1", "mlp.1", "mlp.3", "attn.2"], ["layer.0", "attn.4"],
        [f"layer.{i}" for i in range(LAYERS)]]


def dense_blocks(layers: int = LAYERS) -> list[dict]:
    from rtk.model.modeling_rtk import make_block

    return [make_block(2, 96) for _ in range(layers)]


def test_names_are_canonical_expanded_and_in_model_order():
    r = RemovedSet.of(["mlp.10", "layer.2", "attn.10", "mlp.2"])
    assert r.names == ["attn.2", "mlp.2", "attn.10", "mlp.10"] == list(r)
    assert r == RemovedSet.of(["attn.10", "mlp.10", "layer.2"]) and hash(r) == hash(RemovedSet.of(r))
    assert "layer.2" in r and "attn.10" in r and Sublayer(2, "mlp") in r and "layer.10" in r
    assert "attn.3" not in r and "layer.3" not in r and not RemovedSet() and len(r) == 4
    assert r.lacks("attn", 2) and not r.lacks("attn", 3)
    with pytest.raises(RtkError, match=r"^search.protect: 'ffn.1' is not a sublayer name"):
        RemovedSet.of(["attn.1", "ffn.1"], "search.protect")


@pytest.mark.parametrize("names", SETS)
def test_the_codec_round_trips(names):
    """names -> block_configs -> names; -> skip lists -> names; the attention list keeps the attentions."""
    r = RemovedSet.of(names)
    blocks = r.mark_blocks(dense_blocks())
    assert RemovedSet.from_blocks(blocks) == r
    assert RemovedSet.from_skip_lists(r.skip_lists(), LAYERS) == r
    assert RemovedSet.from_skip_lists(json.loads(json.dumps(r.skip_lists())), LAYERS) == r  # config.json's keys
    attention = r.attention_layers(LAYERS)
    assert attention == [i for i, b in enumerate(blocks) if not b["attention"]["no_op"]]
    assert RemovedSet.from_attention_layers(attention, LAYERS) == RemovedSet(
        tuple(s for s in r.sublayers if s.kind == "attn"))
    # each encoding as rtk writes it
    for s in r.sublayers:
        part = blocks[s.layer][BLOCK_PART[s.kind]]
        assert part["no_op"] is True and part[BLOCK_SIZE[s.kind]] is None
        assert SKIP[s.kind] in r.skip_lists()[s.layer]["skip"]
    assert all(i not in r.skip_lists() for i in range(LAYERS) if not any(r.lacks(k, i) for k in KINDS))


def test_whole_layers_and_the_first_blocker():
    assert RemovedSet.of(["layer.1", "layer.3"]).whole_layers_only() and RemovedSet().whole_layers_only()
    assert not RemovedSet.of(["layer.1", "mlp.3"]).whole_layers_only()
    assert RemovedSet.of(["attn.0"]).first_blocker(3) == Sublayer(0, "mlp")
    assert RemovedSet.of(["layer.0", "attn.1"]).first_blocker(3) == Sublayer(1, "mlp")
    assert RemovedSet.of(["layer.0", "mlp.1"]).first_blocker(3) is None
    assert RemovedSet.of(["mlp.0"]).first_blocker(3) is None


def test_marking_and_reading_name_what_is_wrong():
    with pytest.raises(RtkError, match=r"^plan: 'attn.7' names layer 7, but the model has 5 layers$"):
        RemovedSet.of(["attn.7"]).mark_blocks(dense_blocks())
    with pytest.raises(RtkError, match=r"^plan: 'mlp.1' is already absent from the model$"):
        RemovedSet.of(["mlp.1"]).mark_blocks(RemovedSet.of(["layer.1"]).mark_blocks(dense_blocks()))
    with pytest.raises(RtkError, match=r"^c.json: block_configs\[1\].ffn.no_op must be true or false$"):
        RemovedSet.from_blocks([dense_blocks(1)[0], {"attention": {"no_op": False}}], "c.json")
    for bad in ({"9": {"skip": ["mlp"]}}, {"x": {"skip": ["mlp"]}}, {"1": {"skip": ["mixer"]}}, {"1": ["mlp"]},
                {"1": {"skip": "mlp"}}):
        with pytest.raises(RtkError, match=r"^c.json: per_layer_config\[.*\] must be a layer index below 5 with a "
                                           r"skip list of attention / mlp"):
            RemovedSet.from_skip_lists(bad, LAYERS, "c.json")
    assert RemovedSet.from_skip_lists({"1": {"sliding_window": 8}}, LAYERS) == RemovedSet()  # other overrides


def test_removed_set_reads_every_config_rtk_writes():
    from transformers import AutoConfig

    from rtk.export.configs import standard_config
    from rtk.model.modeling_rtk import config_from_standard
    from rtk.model.rewrite import pruned_config

    r = RemovedSet.of(["attn.0", "layer.2", "mlp.3"])
    cfg = pruned_config(tiny_rtk("llama", layers=4).config, r)
    assert removed_set(cfg) == r == removed_set(json.loads(cfg.to_json_string()))  # nemotron-nas object, json
    std = standard_config(cfg, "llama", list(range(4)), cfg.dtype, r.skip_lists())  # transformers' heterogeneous
    assert std.is_heterogeneous and removed_set(std) == r == removed_set(json.loads(std.to_json_string()))
    assert removed_set(config_from_standard(std)) == r  # what the vLLM plugin builds from
    assert removed_set(AutoConfig.for_model("llama", num_hidden_layers=3).to_dict()) == RemovedSet()  # standard
    onnx = {**json.loads(cfg.to_json_string()), "rtk_onnx": {"attention_layers": r.attention_layers(4)}}
    assert removed_set(onnx) == r
    with pytest.raises(RtkError, match=r"^m/config.json: rtk_onnx.attention_layers \[0, 1\] disagrees with the "
                                       r"layers that keep attention \[1, 3\]$"):
        removed_set({**onnx, "rtk_onnx": {"attention_layers": [0, 1]}}, "m/config.json")
    one_each = r"'block_configs' must list one entry per layer \(2\)"
    for bad, msg in (({"num_hidden_layers": 0}, "'num_hidden_layers' is missing or not a positive integer"),
                     ({"num_hidden_layers": 2, "block_configs": None}, one_each),
                     ({"num_hidden_layers": 2, "block_configs": dense_blocks(3)}, one_each),
                     ({"num_hidden_layers": 2, "per_layer_config": [1]}, "'per_layer_config' must map layer")):
        with pytest.raises(RtkError, match=f"^m/config.json: {msg}"):
            removed_set(bad, "m/config.json")


def test_the_codec_constants_agree_with_modeling_rtk():
    """modeling_rtk (shipped beside weights, self-contained) reads the same encodings with its own constants."""
    from rtk.model.modeling_rtk import SKIP_NAMES, SUBLAYER_MODULES, make_block

    assert SKIP_NAMES == {entry: kind for kind, entry in SKIP.items()}
    assert all(set(table) == set(KINDS) for table in SUBLAYER_MODULES.values())
    present, absent = make_block(2, 96), make_block(None, None)
    for kind, part in BLOCK_PART.items():
        assert present[part]["no_op"] is False and absent[part]["no_op"] is True
        assert present[part][BLOCK_SIZE[kind]] in (2, 96) and absent[part][BLOCK_SIZE[kind]] is None
    assert set(present) == set(BLOCK_PART.values())


def test_the_codec_module_does_not_import_torch():
    code = ("import sys; import rtk.model.sublayer as s; s.removed_set({'num_hidden_layers': 2}); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "toolchain"), "PATH": ""}, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_an_export_checks_its_config_reads_back_as_the_removed_set(tmp_path):
    from rtk.export.verify import check_removed
    from rtk.model.rewrite import pruned_config

    r = RemovedSet.of(["attn.1", "mlp.2"])
    pruned_config(tiny_rtk("llama", layers=3).config, r).save_pretrained(tmp_path)
    check_removed(tmp_path, r, "native")
    with pytest.raises(RtkError, match=r"^export: the written config.json reads as lacking \['attn.1', 'mlp.2'\], "
                                       r"but the model lacks \['attn.1'\] \(native layout\)$"):
        check_removed(tmp_path, RemovedSet.of(["attn.1"]), "native")
    with pytest.raises(RtkError, match="but the model lacks \\[\\] \\(standard layout\\)"):
        check_removed(tmp_path, r, "standard")
