"""`rtk prune` at scale, as a user runs it: both engines, offloaded weights, Ray workers, data sources, and
every bad device / dtype / data / scoring spec -> one line, exit != 0, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from rtk.cli import main


def recipe(tmp_path, model, **over):
    r = {"model": str(model), "device": "cpu", "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 3, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 3, "seq_len": 48}},
         "search": {"method": "progressive", "target": {"sublayers": 3}, "protect": ["attn.0"]}}
    for k, v in over.items():
        node = r
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    p = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def prune(tmp_path, model, name, **over) -> dict:
    out = tmp_path / name
    res = run("prune", recipe(tmp_path, model, **over), "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    return json.loads((out / "plan.json").read_text())


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_plan(a: dict, b: dict, rel=2e-6):
    assert [e["name"] for e in a["removed"]] == [e["name"] for e in b["removed"]]
    for sa, sb in zip(a["steps"], b["steps"]):
        assert sa["scores"].keys() == sb["scores"].keys()
        for k in sa["scores"]:
            assert sb["scores"][k]["ppl"] == pytest.approx(sa["scores"][k]["ppl"], rel=rel)
    assert b["eval"]["ppl_final"] == pytest.approx(a["eval"]["ppl_final"], rel=rel)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_folder):
    """The per-candidate engine's run, everything in memory: what every other way must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    return tmp, prune(tmp, tiny_folder, "per-candidate", scoring__engine="per-candidate")


def test_layer_major_prune_equals_per_candidate(tmp_path, tiny_folder, reference):
    ref_dir, ref = reference
    plan = prune(tmp_path, tiny_folder, "lm", scoring__engine="layer-major", scoring__memory="1MB")
    same_plan(ref, plan)
    assert plan["scoring"]["engine"] == "layer-major" and plan["scoring"]["stream_layer_passes"] > 0
    # one-shot and whole layers too
    for over in ({"search__method": "one-shot"}, {"search__candidates": "blocks", "search__target": {"sublayers": 2},
                                                   "search__protect": ["layer.0"]}):
        a = prune(tmp_path, tiny_folder, f"pc-{len(over)}-{list(over)[0]}", scoring__engine="per-candidate", **over)
        b = prune(tmp_path, tiny_folder, f"lm-{len(over)}-{list(over)[0]}", scoring__engine="layer-major", **over)
        same_plan(a, b)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_prune_writes_the_same_model(tmp_path, tiny_folder, reference, offload):
    ref_dir, ref = reference
    plan = prune(tmp_path, tiny_folder, offload, scoring__engine="layer-major", scoring__offload=offload,
                 scoring__streams="cpu")
    same_plan(ref, plan)
    a, b = ref_dir / "per-candidate" / "model", tmp_path / offload / "model"
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    card = (b / "README.md").read_text()
    assert "max |logit difference| vs the original model run with the removed sublayers skipped" in card
    if offload == "disk":
        assert plan["scoring"]["layer_weight_reads"] > 0


def test_two_ray_workers_give_the_same_plan_as_one(tmp_path, tiny_folder, reference):
    _, ref = reference
    for engine in ("per-candidate", "layer-major"):
        plan = prune(tmp_path, tiny_folder, f"ray-{engine}", scoring__engine=engine, scoring__workers=2)
        assert [e["name"] for e in plan["removed"]] == [e["name"] for e in ref["removed"]]
        same_plan(ref, plan)
        assert plan["scoring"]["workers"] == 2


def test_jsonl_calibration(tmp_path, tiny_folder, data_dir):
    lines = (data_dir / "wikitext-2-raw" / "valid.txt").read_text().split("\n = ")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(lines[:40])))
    plan = prune(tmp_path, tiny_folder, "jsonl", data__calibration={"source": str(corpus), "field": "body",
                                                                     "samples": 3, "seq_len": 32})
    assert plan["calibration"]["text"].startswith("corpus.jsonl (field 'body', 40 records)")
    assert plan["calibration"]["tokens"] == 96


def test_wikitext_32x2048(smollm2_dir):
    from rtk.data import token_blocks
    from rtk.model.load import load_tokenizer
    from rtk.data import DataSpec

    tok = load_tokenizer(str(smollm2_dir))
    b, info = token_blocks(tok, DataSpec(source="wikitext2", split="valid", samples=32, seq_len=2048), "calib")
    assert b.shape == (32, 2048) and info["tokens"] == 65536
    assert len({tuple(r[:8].tolist()) for r in b}) == 32  # 32 different places of the text


def _bad(tmp_path, model, **over) -> str:
    out = tmp_path / "bad-out"
    res = run("prune", recipe(tmp_path, model, **over), "-o", out, "--quiet")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not (tmp_path / "bad-out.partial").exists()
    msg = res.output.strip().splitlines()[-1]  # above it: transformers' own loading bar, if any
    assert msg.startswith("Error: "), res.output
    return msg


def test_bad_device_dtype_scoring(tmp_path, tiny_folder):
    assert not torch.cuda.is_available()  # CI and this machine: no GPU
    msg = _bad(tmp_path, tiny_folder, device="cuda")
    assert "device: cuda is not usable here" in msg and "use device: cpu or auto" in msg
    assert "device: cuda:1 is not usable here" in _bad(tmp_path, tiny_folder, device="cuda:1")
    assert "device: 'tpu' is not one of auto, cpu, cuda, cuda:N" in _bad(tmp_path, tiny_folder, device="tpu")
    msg = _bad(tmp_path, tiny_folder, dtype="float8")
    assert "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'" in msg
    assert "scoring.engine: Input should be 'layer-major' or 'per-candidate'" in _bad(
        tmp_path, tiny_folder, scoring__engine="fast")
    assert "scoring.memory: expected a size like '8GB' or '512MiB', got 'lots'" in _bad(
        tmp_path, tiny_folder, scoring__memory="lots")
    msg = _bad(tmp_path, tiny_folder, scoring__engine="layer-major", scoring__memory="10kB")
    assert msg.startswith("Error: scoring.memory: 10 kB holds 0 activation stream(s) of 24.6 kB (3 blocks x 32 "
                          "tokens x 64 x float32); the layer-major engine needs room for 3")
    assert "offload: disk streams each layer once per step and needs engine: layer-major" in _bad(
        tmp_path, tiny_folder, scoring__engine="per-candidate", scoring__offload="disk")
    assert "scoring.offload: Input should be 'none', 'cpu' or 'disk'" in _bad(
        tmp_path, tiny_folder, scoring__offload="nvme")
    assert "ray_address: set workers: 2 or more" in _bad(tmp_path, tiny_folder, scoring__ray_address="10.0.0.1:6379")
    assert "scoring.workers: Input should be greater than or equal to 1" in _bad(
        tmp_path, tiny_folder, scoring__workers=0)


def test_bad_data_specs(tmp_path, tiny_folder):
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": "wikitext2", "split": "train"})
    assert "data.calibration: split: WikiText-2 has 'valid' and 'test' here (no train), got 'train'" in msg
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a b c " * 400}) + "\n" + json.dumps({"body": "x"}) + "\n")
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": str(corpus), "samples": 2, "seq_len": 32})
    assert "data.calibration.field: 'text' is not in line 2 of c.jsonl (its keys: body)" in msg
    corpus.write_text('{"text": "fine"}\nnot json\n')
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": str(corpus), "samples": 2, "seq_len": 32})
    assert f"data.calibration.source: {corpus}: line 2 is not JSON" in msg
    corpus.write_text(json.dumps({"text": "only a few tokens"}) + "\n")
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": str(corpus), "samples": 2, "seq_len": 32})
    assert "data.calibration:" in msg and "too few for 2 blocks of 32" in msg
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": str(corpus), "split": "train"})
    assert "split: applies to wikitext2 and hub: sources" in msg
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": "wikitext2", "field": "text"})
    assert "field: applies to .jsonl and hub: sources" in msg
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": "hub:", "samples": 2, "seq_len": 32})
    assert "source: 'hub:' needs a dataset id" in msg
    # offline (HF_HUB_OFFLINE=1): a hub dataset that is not in the local cache
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": "hub:allenai/c4", "subset": "en",
                                                          "samples": 2, "seq_len": 32})
    assert msg.startswith("Error: data.calibration") and "allenai/c4" in msg
    msg = _bad(tmp_path, tiny_folder, data__calibration={"source": "wikitext2", "samples": 2, "seq_len": 4096})
    assert "data.calibration.seq_len: 4096 is longer than the model's max_position_embeddings (2048)" in msg


def test_hub_dataset_source_streams_records(tmp_path, smollm2_dir):
    """`source: hub:NAME` goes through datasets.load_dataset(NAME, subset, split=..., streaming=True); a local
    dataset folder takes the same path offline (splits from file names, as on the hub)."""
    from rtk.data import token_blocks
    from rtk.errors import RtkError
    from rtk.model.load import load_tokenizer
    from rtk.data import DataSpec

    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": f"record {i}: " + "the quick brown fox " * 20, "n": i})
                                            + "\n" for i in range(30)))
    (ds / "validation.jsonl").write_text(json.dumps({"text": "validation text " * 50}) + "\n")
    tok = load_tokenizer(str(smollm2_dir))
    b, info = token_blocks(tok, DataSpec(source=f"hub:{ds}", samples=3, seq_len=32), "data.calibration")
    assert b.shape == (3, 32) and info["split"] == "train" and info["field"] == "text"
    first = tok("record 0: " + "the quick brown fox " * 20, add_special_tokens=False)["input_ids"]
    assert b[0].tolist() == first[:32]  # the first records, in order
    with pytest.raises(RtkError, match=r"Bad split: test\. Available splits: \['train', 'validation'\]"):
        token_blocks(tok, DataSpec(source=f"hub:{ds}", split="test", samples=3, seq_len=32), "data.calibration")
    with pytest.raises(RtkError, match=r"field: 'body' is not in record 1 of .* \(its keys: text, n\)"):
        token_blocks(tok, DataSpec(source=f"hub:{ds}", field="body", samples=3, seq_len=32), "data.calibration")
    with pytest.raises(RtkError, match="too few for 300 blocks of 32"):
        token_blocks(tok, DataSpec(source=f"hub:{ds}", samples=300, seq_len=32), "data.calibration")
