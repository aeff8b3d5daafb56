"""rtk's model class: equal to the HF originals, and skipping a branch == the branch being absent."""
import pytest
import torch
import torch.nn.functional as F

from conftest import GEMMA3_WINDOW, tiny_gemma3_config, tiny_hf, tiny_rtk
from rtk.errors import RtkError
from rtk.model.load import from_hf
from rtk.model.rewrite import apply_plan

ARCHS = [("llama", True), ("llama", False), ("mistral", True), ("qwen2", False), ("qwen3", False), ("qwen3", True),
         ("gemma3", True), ("gemma3", False), ("gemma3-capped", True)]


def _inputs(batch=2, t=9, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch,tie", ARCHS)
def test_conversion_matches_hf(arch, tie):
    hf = tiny_hf(arch, tie=tie)
    m = from_hf(hf)
    ids, mask = _inputs()
    with torch.no_grad():
        a = hf(ids, attention_mask=mask).logits
        b = m(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max() < 1e-5
    assert m.config.tie_word_embeddings == tie


@pytest.mark.parametrize("arch,tie", ARCHS)
@pytest.mark.parametrize("plan", [["attn.1"], ["mlp.2"], ["attn.1", "mlp.1"], ["mlp.3", "attn.2", "mlp.0"],
                                  ["layer.2"]])
def test_skip_equals_absent(arch, tie, plan):
    m = tiny_rtk(arch, tie=tie)
    pruned = apply_plan(m, plan)
    from rtk.model.sublayer import expand

    ids, mask = _inputs()
    with torch.no_grad():
        skipped = m(ids, attention_mask=mask, skip=frozenset(expand(plan))).logits
        absent = pruned(ids, attention_mask=mask).logits
        dense = m(ids, attention_mask=mask).logits
    assert torch.allclose(skipped, absent, atol=1e-6)
    assert not torch.allclose(dense, absent, atol=1e-3)  # the plan really changes the model
    n = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert n > 0


def test_pruned_generate_uses_compact_cache():
    m = tiny_rtk("llama")
    pruned = apply_plan(m, ["attn.0", "attn.2", "mlp.3"])
    assert pruned.model.cache_index == [None, 0, None, 1]
    ids, _ = _inputs(batch=1)
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=6, do_sample=False)
        # reference: greedy without a cache, recomputing the whole prefix every step
        seq = ids
        for _ in range(6):
            nxt = pruned(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


def test_gemma3_sliding_windows_matter():
    """The tiny Gemma's test sequences are longer than its window: with the windows widened, the logits change
    (so the equality with transformers above covers the sliding masks and both RoPE bases)."""
    m = tiny_rtk("gemma3")
    ids, mask = _inputs(t=3 * GEMMA3_WINDOW)
    wide = tiny_rtk("gemma3")
    for layer in wide.model.layers:
        if layer.self_attn.window is not None:
            layer.self_attn.window = 64
    with torch.no_grad():
        a = m(ids, attention_mask=mask).logits
        b = wide(ids, attention_mask=mask).logits
    assert not torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4)


@pytest.mark.parametrize("plan", [[], ["attn.1", "mlp.2"], ["attn.0", "attn.3"]])
def test_gemma3_generate_matches_transformers(plan):
    """Greedy generation with rtk's KV cache (attention-indexed, full length, windows applied by the mask) past
    the sliding window equals transformers' Gemma3 (its sliding caches) for the dense model, and the uncached
    recomputation for pruned ones."""
    hf = tiny_hf("gemma3")
    m = apply_plan(from_hf(hf), plan)
    ids, _ = _inputs(batch=1, t=GEMMA3_WINDOW + 2)
    n = 3 * GEMMA3_WINDOW
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=n, do_sample=False)
        if not plan:
            want = hf.generate(ids, max_new_tokens=n, do_sample=False)
        else:
            want = ids
            for _ in range(n):
                nxt = m(want, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                want = torch.cat([want, nxt], 1)
    assert out.tolist() == want.tolist()


@pytest.mark.parametrize("change,message", [
    (dict(attn_logit_softcapping=50.0), "Gemma 3 with attn_logit_softcapping=50.0 is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    (dict(hidden_activation="silu"), "hidden_activation 'silu' is not supported"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}),
     "rope_type 'yarn' for full_attention is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"]),
     "layer_types must name each of the 4 layers full_attention or sliding_attention"),
])
def test_gemma3_variants_rtk_does_not_run_are_one_line(change, message):
    from rtk.model.arch import check_supported, rtk_config_from_hf

    cfg = tiny_gemma3_config(**change)
    with pytest.raises(RtkError, match=message) as e:
        rtk_config_from_hf(cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith("model: ")
    check_supported(tiny_gemma3_config(), "model")  # the tiny Gemma itself is fine


def test_a_gguf_being_dequantized_by_another_process_is_waited_for_not_redone(tmp_path, monkeypatch):
    """gguf_to_folder under the cache lock: while another process holds it (here the test), a second call waits;
    when the folder is there on release, it is used as it is (the stand-in GGUF below could not be read)."""
    import threading

    from rtk.model import load

    monkeypatch.setenv("RTK_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf")
    out, folder = {}, load.gguf_cache_folder(gguf)
    lock = load.cache_lock(folder)
    with lock:
        t = threading.Thread(target=lambda: out.setdefault("got", load.gguf_to_folder(gguf)))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waiting on the lock
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    t.join(30)
    assert out["got"] == folder
    other = tmp_path / "n.gguf"
    other.write_bytes(b"not a gguf either")
    with pytest.raises(RtkError, match="cannot read GGUF file"):  # no folder, no other process: it reads the file
        load.gguf_to_folder(other)


def test_one_pass_ppl_and_block_nll_are_model_ppl_and_each_blocks_nll_exactly():
    from rtk.model.ppl import model_ppl, model_ppl_and_block_nll

    model, blocks = tiny_rtk("llama"), torch.randint(0, 128, (5, 17), generator=torch.Generator().manual_seed(0))
    ppl, per_block = model_ppl_and_block_nll(model, blocks, 2)
    assert ppl == model_ppl(model, blocks, 2)
    with torch.no_grad():
        logits = model(blocks).logits.float()
    direct = [F.cross_entropy(logits[i, :-1], blocks[i, 1:], reduction="sum").item() for i in range(5)]
    assert per_block == pytest.approx(direct, rel=1e-5) and len(per_block) == 5
