"""ModelScorer: PPL as the textbook formula, activation reuse changes nothing but the cost."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_rtk
from rtk.model.params import total_params
from rtk.prune.scoring import ModelScorer, candidates
from rtk.model.rewrite import apply_plan


def _blocks(n=5, t=12, vocab=128):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def test_ppl_is_exp_mean_nll():
    m = tiny_rtk("qwen2")
    b = _blocks()
    with torch.no_grad():
        logits = m(b, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
    s = ModelScorer(m, b, batch_size=2, progress=False)
    assert s.ppl(frozenset()) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    # skipping at run time == the physically pruned model
    pruned = apply_plan(m, ["attn.1", "mlp.3"])
    assert s.ppl(frozenset({"attn.1", "mlp.3"})) == pytest.approx(
        ModelScorer(pruned, b, progress=False).ppl(frozenset()), rel=1e-6)


@pytest.mark.parametrize("kind", ["sublayers", "blocks"])
def test_reuse_matches_recompute_and_saves_work(kind):
    m = tiny_rtk("llama", layers=6)
    b = _blocks()
    cands = candidates(m, kind, protect=["attn.0"])
    removed = frozenset({"mlp.2"})
    fast = ModelScorer(m, b, batch_size=2, reuse_activations=True, progress=False)
    slow = ModelScorer(m, b, batch_size=2, reuse_activations=False, progress=False)
    a, z = fast.score(removed, cands), slow.score(removed, cands)
    assert a.keys() == z.keys() == {c.name for c in cands}
    for k in a:
        assert a[k] == pytest.approx(z[k], rel=1e-5)
    assert fast.layer_passes < 0.7 * slow.layer_passes


def test_candidates_params_and_protect():
    m = tiny_rtk("llama", layers=3, tie=True)
    cands = candidates(m, protect=["attn.0"])
    names = [c.name for c in cands]
    assert names == ["mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    h, kv, inter = 64, 32, 96  # 4 heads of 16, 2 KV heads
    attn = h * h + 2 * h * kv + h * h + h  # q, k, v, o, input norm
    mlp = 3 * h * inter + h  # gate, up, down, post-attention norm
    assert {c.name: c.params for c in cands}["attn.1"] == attn
    assert {c.name: c.params for c in cands}["mlp.1"] == mlp
    # tied embedding counted once: embed + 3 layers + final norm
    assert total_params(m) == 128 * h + 3 * (attn + mlp) + h
    blocks = candidates(m, "blocks", protect=["attn.0"])
    assert [c.name for c in blocks] == ["layer.1", "layer.2"]  # layer 0 holds a protected sublayer
