"""Perplexity, computed one way everywhere: the summed next-token NLL of each block (every token after the
first is predicted), exp(mean) over all predicted tokens, and +inf where exp would overflow. The scoring
engines' KL criterion is the same with KL(original model || model) per predicted token in place of the NLL."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

EXP_MAX = 700.0  # exp(700) ~ 1e304; beyond it a float overflows, and the model is broken anyway


def ppl_of(nll_sum: float, n_tokens: int) -> float:
    """exp(nll_sum / n_tokens), +inf when that overflows."""
    mean = nll_sum / n_tokens
    return math.exp(mean) if mean < EXP_MAX else math.inf


def logits_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy (float32) of logits [..., vocab] against the next tokens [...]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum").item()


def logits_kl(logits: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """Summed KL(teacher || student) (float32) of logits [..., vocab] against the teacher's log-softmax [..., vocab]."""
    return (teacher_logp.exp() * (teacher_logp - F.log_softmax(logits.float(), dim=-1))).sum().item()


def logprobs_ppl(per_sequence: Iterable[Sequence[float]]) -> dict:
    """PPL from the log-probabilities of every predicted token (rtk bench's backends), with each sequence's summed
    NLL and predicted tokens (block_nll, block_tokens: what a paired interval over the blocks resamples)."""
    block_nll, block_tokens = [], []
    for lp in per_sequence:
        block_nll.append(-float(sum(lp)))
        block_tokens.append(len(lp))
    nll, n = sum(block_nll), sum(block_tokens)
    return {"ppl": ppl_of(nll, n), "nll_per_token": nll / n, "predicted_tokens": n, "block_nll": block_nll,
            "block_tokens": block_tokens}


def _full_logits(model, blocks: torch.Tensor, batch_size: int):
    """(ids, logits of the predicted positions) per batch of [N, T] token blocks, all sublayers run."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pos = torch.arange(blocks.shape[1], device=device)[None]
    cos, sin = model.model.rotary(pos, dtype)
    for ids in blocks.split(batch_size):
        ids = ids.to(device)
        h = model.model.run_layers(model.model.embed_tokens(ids), cos, sin, None, 0, len(model.model.layers),
                                   frozenset())
        yield ids, model.lm_head(model.model.norm(h[:, :-1]))


@torch.no_grad()
def model_ppl(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """PPL of an rtk model (all its sublayers run) on [N, T] token blocks; the same operations, in the same
    order, as the scoring engines' PPL of the model with nothing skipped."""
    total = sum(logits_nll(logits, ids[:, 1:]) for ids, logits in _full_logits(model, blocks, batch_size))
    return ppl_of(total, int(blocks.shape[0] * (blocks.shape[1] - 1)))


@torch.no_grad()
def model_ppl_and_block_nll(model, blocks: torch.Tensor, batch_size: int = 4) -> tuple[float, list[float]]:
    """model_ppl and each [T]-token block's summed next-token NLL (float32), all sublayers run, from one pass over
    the blocks (the PPL summed per batch as model_ppl sums it, so it is the same number). The per-block NLLs are
    what a paired PPL interval over the blocks resamples (each block predicts T - 1 tokens)."""
    total, per_block = 0.0, []
    for ids, logits in _full_logits(model, blocks, batch_size):
        total += logits_nll(logits, ids[:, 1:])
        per_block += [logits_nll(logits[i], ids[i, 1:]) for i in range(ids.shape[0])]
    return ppl_of(total, int(blocks.shape[0] * (blocks.shape[1] - 1))), per_block


@torch.no_grad()
def teacher_logprobs(model, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The rtk model's log-softmax (float32, on the CPU) at every predicted position of [N, T] token blocks,
    [N, T-1, vocab]: the reference distributions of the scoring engines' KL criterion."""
    out = [F.log_softmax(logits.float(), dim=-1).cpu() for _, logits in _full_logits(model, blocks, batch_size)]
    return torch.cat(out)
