"""Block influence (ShortGPT's BI, Gromov et al.'s angular distance): how much a piece of the model changes the
residual stream, from one pass of the dense model over the calibration blocks, without any removal.

The residual stream is read at every sublayer boundary: boundary 2i enters layer i, 2i+1 lies between its
attention and its MLP, 2L leaves the last layer. The influence of the piece between boundaries a < b is
1 - mean over calibration tokens of cos(h_a, h_b): a sublayer is (k, k+1), layer i is (2i, 2i+2), the span of
layers l..l+n-1 is (2l, 2l+2n).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def sublayer_pair(name: str) -> tuple[int, int]:
    """The boundaries around a candidate: attn.i, mlp.i, layer.i."""
    kind, _, idx = name.partition(".")
    i = int(idx)
    return {"attn": (2 * i, 2 * i + 1), "mlp": (2 * i + 1, 2 * i + 2), "layer": (2 * i, 2 * i + 2)}[kind]


def candidate_influence(model, blocks: torch.Tensor, names: list[str], batch_size: int = 4) -> dict[str, float]:
    """BI of each candidate (attn.i / mlp.i / layer.i) of the dense model."""
    got = boundary_influence(model, blocks, sorted({sublayer_pair(n) for n in names}), batch_size)
    return {n: got[sublayer_pair(n)] for n in names}


def block_influence(model, blocks: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """BI(layer i) = 1 - mean over calibration tokens of cos(h_in_i, h_out_i) (ShortGPT), dense model."""
    return candidate_influence(model, blocks, [f"layer.{i}" for i in range(len(model.model.layers))], batch_size)


def span_influence(model, blocks: torch.Tensor, starts: list[int], length: int, batch_size: int = 4) -> dict:
    """{start: angular distance between the stream entering layer `start` and leaving layer start+length-1}."""
    got = boundary_influence(model, blocks, [(2 * s, 2 * (s + length)) for s in starts], batch_size)
    return {s: got[(2 * s, 2 * (s + length))] for s in starts}
