"""The KL criterion of the scoring engines: exp(mean KL(original || pruned)) per predicted token, by hand,
the same from both engines, and the PPL path untouched without it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_rtk
from rtk.errors import RtkError
from rtk.model.layers import InMemory
from rtk.model.ppl import logits_kl, model_ppl, teacher_logprobs
from rtk.prune.config import ScoringConfig
from rtk.prune.scoring import Loaded, ModelScorer, candidates, scorer_for
from rtk.prune.scoring.layer_major import LayerMajorScorer

REL = 1e-5
N, T, HIDDEN = 5, 17, 64
STREAM_BYTES = N * T * HIDDEN * 4


def blocks(seed=0):
    return torch.randint(0, 128, (N, T), generator=torch.Generator().manual_seed(seed))


def model():
    m = tiny_rtk("llama", layers=5)
    with torch.no_grad():
        m.model.norm.weight.mul_(6)  # peaked next-token distributions: removals move them measurably
    return m


def engines(m, b, teacher):
    """Every engine and layout, KL criterion: per-candidate (reuse or not), layer-major in one pass, in groups
    of 2 candidates (4 streams' budget) and with its streams in host memory."""
    return [ModelScorer(m, b, 2, True, progress=False, teacher_logprobs=teacher),
            ModelScorer(m, b, 3, False, progress=False, teacher_logprobs=teacher),
            LayerMajorScorer(InMemory(m), b, 3, 10 ** 9, progress=False, teacher_logprobs=teacher),
            LayerMajorScorer(InMemory(m), b, 2, 4 * STREAM_BYTES, progress=False, teacher_logprobs=teacher),
            LayerMajorScorer(InMemory(m), b, 3, 1, "cpu", progress=False, teacher_logprobs=teacher)]


def close(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(abs(a[k] - b[k]) / b[k] for k in b)


def test_logits_kl_is_kl_div():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g) * 3
    teacher = F.log_softmax(torch.randn(3, 7, 50, generator=g) * 3, dim=-1)
    want = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="sum", log_target=True).item()
    assert want > 1 and logits_kl(logits, teacher) == pytest.approx(want, rel=1e-6)
    assert logits_kl(logits.to(torch.bfloat16), teacher) == pytest.approx(
        F.kl_div(F.log_softmax(logits.to(torch.bfloat16).float(), -1), teacher, reduction="sum",
                 log_target=True).item(), rel=1e-6)  # student computed in float32
    assert logits_kl(logits, F.log_softmax(logits, -1)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_logprobs_are_the_models():
    m, b = model(), blocks()
    t = teacher_logprobs(m, b, batch_size=2)
    assert t.shape == (N, T - 1, 128) and t.dtype == torch.float32 and t.device.type == "cpu"
    with torch.no_grad():
        want = F.log_softmax(m(b, use_cache=False).logits[:, :-1].float(), -1)
    assert torch.allclose(t, want, atol=1e-5)
    nll = -t.gather(-1, b[:, 1:, None]).sum().item()
    assert math.exp(nll / (N * (T - 1))) == pytest.approx(model_ppl(m, b, batch_size=2), rel=1e-6)


def test_kl_is_exp_mean_kl_by_hand():
    m, b = model(), blocks()
    t = teacher_logprobs(m, b)
    with torch.no_grad():
        logp = F.log_softmax(m(b, use_cache=False, skip=frozenset({"mlp.1"})).logits[:, :-1].float(), -1)
    mean_kl = (t.exp() * (t - logp)).sum().item() / (N * (T - 1))
    assert mean_kl > 1e-3
    for s in engines(m, b, t):
        assert s.criterion == "kl"
        assert s.ppl(frozenset()) == pytest.approx(1.0, abs=1e-5)
        kl = s.ppl(frozenset({"mlp.1"}))
        assert kl == pytest.approx(math.exp(mean_kl), rel=REL)
        assert math.log(kl) == pytest.approx(mean_kl, rel=1e-4)  # the KL itself, not only exp of it


@pytest.mark.parametrize("kind", ["sublayers", "blocks"])
def test_engines_agree_on_kl(kind):
    m, b = model(), blocks()
    t = teacher_logprobs(m, b)
    removed = frozenset({"attn.2", "mlp.3"})
    cands = [c for c in candidates(m, kind) if not set(c.parts) & removed]
    ref, *others = engines(m, b, t)
    want = ref.score(removed, cands)
    assert min(want.values()) > 1.0
    for s in others:
        assert close(s.score(removed, cands), want) < REL, s
    assert others[2].groups_run == -(-len(cands) // 2)  # 4 streams: base, its kept state, 2 candidates


def test_without_teacher_the_ppl_path():
    m, b = model(), blocks()
    removed = frozenset({"attn.2"})
    cands = [c for c in candidates(m) if not set(c.parts) & removed]
    pc = ModelScorer(m, b, 2, progress=False)
    lm = LayerMajorScorer(InMemory(m), b, 2, 4 * STREAM_BYTES, progress=False)
    assert pc.criterion == lm.criterion == "ppl"
    assert pc.ppl() == model_ppl(m, b, batch_size=2)
    assert lm.ppl() == pytest.approx(model_ppl(m, b, batch_size=2), rel=2e-6)
    want = pc.score(removed, cands)
    with torch.no_grad():
        logits = m(b, use_cache=False, skip=removed | {"mlp.1"}).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), b[:, 1:].reshape(-1)).item()
    assert want["mlp.1"] == pytest.approx(math.exp(nll), rel=REL)
    assert close(lm.score(removed, cands), want) < 2e-6


@pytest.mark.parametrize("engine", ["per-candidate", "layer-major"])
def test_scorer_for_passes_it_through(engine):
    m, b = model(), blocks()
    t = teacher_logprobs(m, b)
    scoring = ScoringConfig(engine=engine, batch_size=2)
    recipe, loaded = SimpleNamespace(scoring=scoring), Loaded(m, None, "", InMemory(m), "none")
    s = scorer_for(recipe, loaded, b, False, teacher_logprobs=t)
    assert s.criterion == "kl" and s.teacher is t
    assert s.ppl(frozenset()) == pytest.approx(1.0, abs=1e-5)
    assert scorer_for(recipe, loaded, b, False).criterion == "ppl"
    with pytest.raises(RtkError) as e:
        scorer_for(recipe, loaded, b, False, pool=object(), teacher_logprobs=t)
    assert e.value.message == "search criterion kl: not supported with scoring.workers > 1 (Ray); use one worker"
