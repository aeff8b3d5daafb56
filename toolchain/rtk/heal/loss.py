"""The distillation loss, fused with both LM heads and computed chunk by chunk over the tokens.

    loss = kl_weight * T^2 * mean_tokens KL(softmax(teacher / T) || softmax(student / T))
         + ce_weight * mean_predicted_tokens CE(student, next token)

Logits are [tokens, vocab]: for a 128k vocabulary and 8k tokens that is 4 GB per float32 copy, and the
plain autograd loss keeps several. Here, as in Liger's fused linear cross-entropy, each chunk of tokens
gets its logits (student and teacher, float32), its loss and its gradient in the forward pass, and only
the gradients of the student's final hidden states and LM-head weight are kept for backward: memory is
one chunk's logits whatever the vocabulary, and nothing is computed twice.
"""
from __future__ import annotations

import torch

from rtk.errors import RtkError
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in float32)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, th, tw, targets, kl_weight: float, ce_weight: float, temperature: float):
        n, vocab = h.shape[0], w.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        valid = targets >= 0
        n_ce = max(1, int(valid.sum()))
        t_ = temperature
        kl_sum = h.new_zeros((), dtype=torch.float32)
        ce_sum = h.new_zeros((), dtype=torch.float32)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            hc = h[a:b]
            s = (hc @ w.T).float()
            g = torch.zeros_like(s)
            if kl_weight:
                log_ps = F.log_softmax(s / t_, dim=-1)
                log_pt = F.log_softmax((th[a:b] @ tw.T).float() / t_, dim=-1)
                pt = log_pt.exp()
                kl_sum += (pt * (log_pt - log_ps)).sum()
                g += (kl_weight * t_ / n) * (log_ps.exp() - pt)  # d(T^2 KL / n) / ds = T (p_s - p_t) / n
                del log_ps, log_pt, pt
            if ce_weight:
                tc, vc = targets[a:b], valid[a:b]
                log_p = F.log_softmax(s, dim=-1)
                safe = tc.clamp(min=0)
                ce_sum += -(log_p.gather(-1, safe[:, None])[:, 0] * vc).sum()
                gce = log_p.exp()
                gce[torch.arange(b - a, device=s.device), safe] -= 1.0
                g += (ce_weight / n_ce) * gce * vc[:, None]
                del log_p, gce
            if need_h:
                gh[a:b] = (g.to(w.dtype) @ w).to(h.dtype)
            if need_w:
                gw += g.T @ hc.float()
            del s, g
        kl = kl_sum * (t_ * t_) / n
        ce = ce_sum / n_ce
        loss = kl_weight * kl + ce_weight * ce
        ctx.save_for_backward(gh if need_h else None, gw.to(w.dtype) if need_w else None)
        return torch.stack([loss, kl, ce])

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        g = grad_out[0]
        return (gh * g.to(gh.dtype) if gh is not None else None, gw * g.to(gw.dtype) if gw is not None else None,
                None, None, None, None, None, None)


def distill_loss(hidden: torch.Tensor, head_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_head_weight: torch.Tensor, ids: torch.Tensor, kl_weight: float, ce_weight: float,
                 temperature: float) -> tuple[torch.Tensor, float, float]:
    """(loss, KL, CE) of one micro-batch from the final (normed) hidden states [b, t, h] of student and
    teacher and their LM-head weights [vocab, h]; `ids` [b, t] the text (CE predicts ids[:, 1:])."""
    b, t, _ = hidden.shape
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    out = _FusedKD.apply(hidden.reshape(b * t, -1), head_weight, teacher_hidden.reshape(b * t, -1),
                         teacher_head_weight, targets.reshape(-1), float(kl_weight), float(ce_weight),
                         float(temperature))
    kl, ce = out[1].item(), out[2].item()
    return out[0], (kl if kl_weight else float("nan")), (ce if ce_weight else float("nan"))


# ---- intermediate states ----------------------------------------------------------------------
class LayerOutputs:
    """Collects the residual stream after each decoder layer of a model while it runs (forward hooks)."""

    def __init__(self, model):
        self.out: list[torch.Tensor] = []
        self.on = False  # records only between start() and take(): evaluation passes are not kept
        self._hooks = [layer.register_forward_hook(self._keep) for layer in model.model.layers]

    def _keep(self, _module, _args, output):
        if self.on:
            self.out.append(output)

    def start(self) -> None:
        self.out, self.on = [], True

    def take(self) -> list[torch.Tensor]:
        out, self.out, self.on = self.out, [], False
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def hidden_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of ||h_student - h_teacher||^2 / ||h_teacher||^2 (each token's residual
    stream against the teacher's after the same layer; the pruned model keeps every layer, so they line up)."""
    if len(student_states) != len(teacher_states):
        raise RtkError(f"heal.hidden_weight: the student runs {len(student_states)} layers, the teacher "
                       f"{len(teacher_states)}: intermediate states need the same layer count (set it to 0)")
    total = 0.0
    for hs, ht in zip(student_states, teacher_states):
        ht = ht.float()
        total = total + ((hs.float() - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / len(student_states)
