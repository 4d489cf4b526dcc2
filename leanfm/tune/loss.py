"""Causal-LM loss without the full logits: cross-entropy fused with the LM head, chunked over the vocabulary.

Gemma 3's head is 262,144 x 640: full fp32 logits for 1,000 tokens take 1 GB, and autograd would keep
them (and their softmax) for the backward pass. Here the loss and its gradient w.r.t. the hidden states
are computed together in one pass over vocabulary chunks, with an online log-sum-exp (as flash
attention does over keys):

    lse_i   = log sum_v exp(l_iv),            l = h W^T (soft-capped: cap * tanh(h W^T / cap))
    dL/dh_i = sum_v softmax_iv l'_iv W_v  -  l'_iy W_y

so the peak extra memory is two (tokens x chunk) blocks, and the backward pass only scales the stored
dL/dh. Only positions with a label are scored. The head must be frozen (a plain or quantized linear);
a trained head falls back to materialised logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune.data import IGNORE
from leanfm.tune.layers import AdapterHost
from leanfm.tune.qlora import dequantized_rows

__all__ = ["CausalLMLoss", "fused_linear_cross_entropy", "lm_loss_sum"]

DEFAULT_CHUNK = 8192


def _rows(head: nn.Module):
    """(vocab, rows(start, end) -> fp32 weight rows, gather(ids) -> fp32 rows) of a frozen head."""
    if isinstance(head, QuantLinear):
        def gather(ids: Tensor) -> Tensor:
            from leanfm.ops.quant import dequantize, unpack_bits

            codes = unpack_bits(head.qweight[ids], head.bits, head.in_features)
            return dequantize(codes, head.scales[ids], head.zeros[ids])

        return head.out_features, lambda a, b: dequantized_rows(head, a, b), gather
    w = head.weight
    return w.shape[0], lambda a, b: w[a:b].float(), lambda ids: w[ids].float()


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the loss is computed in fp32 even under bf16 autocast
    def forward(ctx, h: Tensor, y: Tensor, head: nn.Module, softcap: float | None, chunk: int) -> Tensor:
        vocab, rows, gather = _rows(head)
        hf = h.detach().float()
        n = hf.shape[0]
        m = torch.full((n,), float("-inf"))
        s = torch.zeros(n)
        target = torch.zeros(n)
        acc = torch.zeros_like(hf) if ctx.needs_input_grad[0] else None
        for a in range(0, vocab, chunk):
            b = min(vocab, a + chunk)
            w = rows(a, b)
            z = hf @ w.T  # (N, chunk)
            t = torch.tanh(z / softcap) if softcap else None
            logits = t * softcap if softcap else z
            inside = (y >= a) & (y < b)
            target[inside] = logits[inside, y[inside] - a]
            m_new = torch.maximum(m, logits.amax(1))
            rescale = torch.exp(m - m_new)
            e = torch.exp(logits - m_new[:, None])
            s = s * rescale + e.sum(1)
            if acc is not None:
                if softcap:
                    e = e * (1 - t * t)
                acc = acc * rescale[:, None] + e @ w
            m = m_new
        loss = (m + torch.log(s) - target).sum()
        if acc is not None:
            dy = 1 - (target / softcap) ** 2 if softcap else torch.ones(n)
            grad = acc / s[:, None] - dy[:, None] * gather(y)
            ctx.save_for_backward(grad.to(h.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def fused_linear_cross_entropy(h: Tensor, y: Tensor, head: nn.Module, softcap: float | None = None,
                               chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Sum over rows of CE(head(h), y) for h (N, hidden), y (N,) without materialising (N, vocab)."""
    return _FusedLinearCE.apply(h, y, head, softcap, chunk)


def _head_is_frozen(head: nn.Module) -> bool:
    if not torch.is_grad_enabled():  # evaluation: nothing is trained
        return not isinstance(head, AdapterHost) or head.active_branch() is None
    if isinstance(head, AdapterHost) and head.active_branch() is not None:
        return False
    return not any(p.requires_grad for p in head.parameters()) and getattr(head, "bias", None) is None


def lm_loss_sum(model: nn.Module, hidden: Tensor, labels: Tensor, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, int]:
    """(summed next-token loss, number of scored tokens) for hidden (B, T, H) and shifted labels (B, T)."""
    mask = labels != IGNORE
    h, y = hidden[mask], labels[mask]
    n = int(y.numel())
    head = model.lm_head
    if n == 0:
        return hidden.sum() * 0.0, 0
    if _head_is_frozen(head) and isinstance(head, (nn.Linear, QuantLinear)):
        return fused_linear_cross_entropy(h, y, head, model.config.final_logit_softcapping, chunk), n
    logits = model.compute_logits(h).float()
    return F.cross_entropy(logits, y, reduction="sum"), n


class CausalLMLoss(nn.Module):
    """model + loss as one module: forward(input_ids, labels) -> (summed loss, scored tokens as a tensor).
    Data-parallel and sharded wrappers go around this module, so the head is in place during the loss."""

    def __init__(self, model: nn.Module, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.model(input_ids, positions)
        loss, n = lm_loss_sum(self.model, hidden, labels, self.chunk)
        return loss, torch.tensor(n)
