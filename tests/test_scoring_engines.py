"""The scoring engines against each other: layer-major vs per-candidate, offloaded (cpu / disk) vs in memory,
Ray workers vs one; PPLs within float tolerance and identical plans."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_hf
from rtk.export.verify import logits, probe_inputs
from rtk.model.load import from_hf
from rtk.model.params import total_params
from rtk.prune.scoring import ModelScorer, candidates
from rtk.prune.scoring.layer_major import LayerMajorScorer
from rtk.model.layers import CpuOffload, DiskOffload, InMemory, streamed_logits
from rtk.prune.search import StopRule, run_search

ARCHS = [("llama", True), ("mistral", False), ("qwen2", False), ("gemma3", True)]
REL = 2e-6  # fp32: batching streams together changes summation order, nothing else


def blocks(n=5, t=17, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def stream_bytes(n=5, t=17, hidden=64):
    return n * t * hidden * 4


def close(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(abs(a[k] - b[k]) / b[k] for k in b)


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_layer_major_equals_per_candidate(arch, tie):
    m = from_hf(tiny_hf(arch, layers=5, tie=tie)).eval()
    b = blocks()
    ref = ModelScorer(m, b, batch_size=2, progress=False)
    for removed in (frozenset(), frozenset({"attn.2", "mlp.3"}), frozenset({"attn.1", "mlp.1"})):
        for kind in ("sublayers", "blocks"):
            cands = [c for c in candidates(m, kind) if not set(c.parts) & removed]
            want = ref.score(removed, cands)
            # one pass; candidates in groups (budget of 4 streams); all streams waiting in host memory
            for mem, streams in ((10 ** 9, "device"), (4 * stream_bytes(), "device"), (1, "cpu")):
                lm = LayerMajorScorer(InMemory(m), b, batch_size=3, memory_bytes=mem, streams=streams, progress=False)
                assert close(lm.score(removed, cands), want) < REL, (removed, kind, mem, streams)
                assert lm.ppl(removed) == pytest.approx(ref.ppl(removed), rel=REL)
                if mem == 4 * stream_bytes():
                    assert lm.groups_run == -(-len(cands) // 2)  # 4 streams: base, its kept state, 2 candidates
                else:
                    assert lm.groups_run == 1


def test_layer_major_reads_each_layer_once_per_step(tmp_path):
    hf = tiny_hf("llama", layers=6)
    hf.save_pretrained(tmp_path)
    m = from_hf(hf).eval()
    src = DiskOffload(tmp_path, m.config, "cpu", torch.float32)
    lm = LayerMajorScorer(src, blocks(), batch_size=2, memory_bytes=1, streams="cpu", progress=False)
    lm.score(frozenset(), candidates(m))
    assert src.weight_reads == 6  # one pass over the 6 layers for all 12 candidates
    src.close()


def _plan(scorer, m, method, kind, protect=("attn.0",), target=None):
    cands = candidates(m, kind, protect)
    stop = StopRule(params_total=total_params(m), **(target or {"sublayers": 4 if kind == "sublayers" else 2}))
    st = run_search(scorer, cands, stop, method, "params")
    return [e["name"] for e in st["removed"]], [e["ppl_after"] for e in st["removed"]]


@pytest.mark.parametrize("arch,tie", ARCHS)
@pytest.mark.parametrize("method", ["progressive", "one-shot"])
@pytest.mark.parametrize("kind", ["sublayers", "blocks"])
def test_same_plans_both_engines(arch, tie, method, kind):
    m = from_hf(tiny_hf(arch, layers=5, tie=tie)).eval()
    b = blocks()
    protect = ("attn.0", "mlp.4") if kind == "sublayers" else ("layer.0",)
    a_names, a_ppl = _plan(ModelScorer(m, b, 2, progress=False), m, method, kind, protect)
    for mem in (10 ** 9, 4 * stream_bytes()):
        b_names, b_ppl = _plan(LayerMajorScorer(InMemory(m), b, 3, mem, progress=False), m, method, kind, protect)
        assert a_names == b_names
        assert b_ppl == pytest.approx(a_ppl, rel=REL)


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_offload_cpu_and_disk_equal_in_memory(tmp_path, arch, tie):
    hf = tiny_hf(arch, layers=5, tie=tie)
    hf.save_pretrained(tmp_path)
    m = from_hf(hf).eval()
    b = blocks()
    want_names, want_ppl = _plan(LayerMajorScorer(InMemory(m), b, 3, progress=False), m, "progressive", "sublayers")
    sources = [CpuOffload(from_hf(tiny_hf(arch, layers=5, tie=tie)).eval(), "cpu"),
               DiskOffload(tmp_path, m.config, "cpu", torch.float32)]
    inputs = probe_inputs(128)
    for src in sources:
        names, ppl = _plan(LayerMajorScorer(src, b, 3, progress=False), m, "progressive", "sublayers")
        assert names == want_names and ppl == pytest.approx(want_ppl, rel=REL)
        # a whole forward pass through the source equals the model's, skips included
        assert torch.equal(streamed_logits(src, inputs, {"attn.3", "mlp.1"}), logits(m, inputs, {"attn.3", "mlp.1"}))
        src.close()


def test_disk_offload_keeps_only_embeddings_and_head(tmp_path, monkeypatch):
    hf = tiny_hf("llama", layers=3, tie=False)
    hf.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    src = DiskOffload("m", from_hf(hf).config, "cpu", torch.bfloat16)  # a relative folder, as recipes give it
    real = {k for k, v in src.model.state_dict().items() if v.device.type != "meta"}
    assert real == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(v.dtype == torch.bfloat16 for k, v in src.model.state_dict().items() if k in real)
    w = src.fetch(1)
    assert set(w) == {k.removeprefix("model.layers.1.") for k in src.files.by_layer[1]}
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    src.close()


def test_memory_budget_too_small_is_one_line():
    from rtk.errors import RtkError

    m = from_hf(tiny_hf("llama", layers=2)).eval()
    with pytest.raises(RtkError) as e:
        LayerMajorScorer(InMemory(m), blocks(), 2, memory_bytes=2 * stream_bytes(), progress=False)
    msg = str(e.value.message)
    assert msg.startswith("scoring.memory:") and "room for 3" in msg and "streams: cpu" in msg and "\n" not in msg


def test_write_safetensors_streams_a_readable_file(tmp_path):
    from safetensors.torch import load_file

    from rtk.export.shards import write_shards

    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c.d": torch.arange(4)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    write_shards(tmp_path, specs, lambda k: ts[k])
    got = load_file(tmp_path / "model.safetensors")
    assert set(got) == set(ts) and all(torch.equal(got[k], ts[k]) for k in ts)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_shards(sharded, specs, lambda k: ts[k], shard_bytes=64)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(sharded / f))
    assert all(torch.equal(got[k], ts[k]) for k in ts)
