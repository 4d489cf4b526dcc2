"""Helpers shared by the anchor runners: a window and the NLL of its scored positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Window:
    ids: list[int]  # the exact token ids fed to every engine
    scored: list[bool]  # scored[i]: token i is a target, predicted from the logits at i - 1


def nll_on_scored(logits: torch.Tensor, window: Window) -> tuple[float, int]:
    """Sum of -log p(ids[i] | ids[:i]) over the scored positions, from logits (T, V), and their count."""
    ids = torch.tensor(window.ids)
    mask = torch.tensor(window.scored)
    mask[0] = False  # nothing predicts the first token
    targets = mask.nonzero().squeeze(1)
    logp = torch.log_softmax(logits[targets - 1].float(), dim=-1)
    nll = -logp.gather(1, ids[targets].unsqueeze(1)).double().sum()
    return float(nll), int(targets.numel())
