"""Block influence (ShortGPT's BI, Gromov et al.'s angular distance): how much a piece of the model changes the
residual stream, from one pass of the dense model over the calibration blocks, without any removal.

The residual stream is read at every sublayer boundary: boundary 2i enters layer i, 2i+1 lies between its
attention and its MLP, 2L leaves the last layer. The influence of the piece between boundaries a < b is
1 - mean over calibration tokens of cos(h_a, h_b): a sublayer is (k, k+1), layer i is (2i, 2i+2), a run of
consecutive candidates from its first one's entry to its last one's exit (layers l..l+n-1: (2l, 2l+2n)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rtk.prune.search import Candidate


@torch.no_grad()
def boundary_influence(model, blocks: torch.Tensor, pairs: list[tuple[int, int]], batch_size: int = 4) -> dict:
    """{(a, b): 1 - mean cos(h_a, h_b)} over every calibration token, for the boundary pairs asked."""
    m = model.model
    dev = next(model.parameters()).device
    pos = torch.arange(blocks.shape[1], device=dev)[None]
    cos, sin = m.rotary(pos, next(model.parameters()).dtype)
    sums, n = dict.fromkeys(pairs, 0.0), 0
    for chunk in blocks.split(batch_size):
        h = m.embed_tokens(chunk.to(dev))
        states = [h]
        for i, layer in enumerate(m.layers):
            h = layer(h, cos, sin, None, None, m.cache_index[i], skip_mlp=True)
            states.append(h)
            h = layer(h, cos, sin, None, None, m.cache_index[i], skip_attn=True)
            states.append(h)
        for a, b in pairs:
            sums[(a, b)] += F.cosine_similarity(states[a].float(), states[b].float(), dim=-1).sum().item()
        n += chunk.numel()
    return {p: 1.0 - s / n for p, s in sums.items()}


def boundaries(piece: list[Candidate]) -> tuple[int, int]:
    """The boundaries around a run of consecutive candidates: the first one's entry, the last one's exit."""
    first, last = piece[0], piece[-1]
    return 2 * first.layer + (first.kind == "mlp"), 2 * last.layer + 1 + (last.kind != "attn")


def piece_influence(model, blocks: torch.Tensor, pieces: dict[str, list[Candidate]],
                    batch_size: int = 4) -> dict[str, float]:
    """BI of each piece ({name: its consecutive candidates}; a candidate alone is the piece [c]), dense model."""
    got = boundary_influence(model, blocks, sorted({boundaries(p) for p in pieces.values()}), batch_size)
    return {k: got[boundaries(p)] for k, p in pieces.items()}
