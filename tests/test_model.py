"""rtk's model class: equal to the HF originals, and skipping a branch == the branch being absent."""
import pytest
import torch

from conftest import tiny_hf, tiny_rtk
from rtk.model.load import from_hf
from rtk.model.rewrite import apply_plan

ARCHS = [("llama", True), ("llama", False), ("mistral", True), ("qwen2", False), ("qwen3", False), ("qwen3", True)]


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
