"""Distillation losses on logits: pure functions, no module state.

With teacher distribution p and student distribution q over the vocabulary (both softened by a
temperature T: softmax(logits / T)), per token:

    forward_kl = KL(p || q) = sum p (log p - log q)     mean-seeking: the student covers the teacher
    reverse_kl = KL(q || p) = sum q (log q - log p)     mode-seeking (MiniLLM)
    jsd        = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2     symmetric, bounded by log 2

Each is multiplied by T^2 so that gradients keep their scale across temperatures (Hinton et al. 2015).
`distill_loss` returns the *sum* over tokens, so that a caller scoring a long sequence in slices of
tokens (to keep (tokens, vocab) logits small) can add the slices up and divide once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DISTILL_LOSSES", "distill_loss"]

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl",
                 temperature: float = 1.0) -> Tensor:
    """Sum over tokens of the per-token divergence `kind` between teacher and student logits (..., V),
    computed in fp32 and scaled by temperature^2. Gradients flow to whichever input requires them."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = (lt.exp() * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        d = (ls.exp() * (ls - lt)).sum(-1)
    elif kind == "jsd":
        lm = torch.logaddexp(ls, lt) - math.log(2.0)
        d = 0.5 * ((lt.exp() * (lt - lm)).sum(-1) + (ls.exp() * (ls - lm)).sum(-1))
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {DISTILL_LOSSES}")
    return d.sum() * (temperature * temperature)
