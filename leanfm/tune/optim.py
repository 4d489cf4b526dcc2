"""Optimizers and learning-rate schedules for fine-tuning.

    AdamW8bit  AdamW whose moment estimates are stored as blockwise 8-bit codes (2 bytes per parameter
               plus 8 bytes per block of 256, instead of 8 bytes per parameter)
    MeZO       zeroth-order SGD from two forward passes (Malladi et al. 2023): the perturbation z is
               regenerated from a seed each time it is needed, never stored
    lr_lambda  linear warmup, then cosine / linear decay to zero, or constant
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from leanfm.tune.functional import dequantize_blockwise, quantize_blockwise

__all__ = ["AdamW8bit", "MeZO", "lr_lambda"]

BLOCK = 256
MIN_8BIT = 4096  # smaller tensors keep fp32 states (their memory is negligible)
_M_POWER, _V_POWER = 4.0, 4.0  # companding of m (signed) and sqrt(v) (unsigned): ~9 decades each


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear or constant")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantized moments (dequantized, updated and re-quantized each step).
    The update rule is torch.optim.AdamW's; only the stored states differ."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every loaded state tensor to its parameter's dtype; put the 8-bit codes back."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "m_codes" in state:
                state["m_codes"] = state["m_codes"].to(torch.int8)
                state["v_codes"] = state["v_codes"].to(torch.uint8)

    @staticmethod
    def _init_state(state: dict, p: Tensor) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.numel() < MIN_8BIT:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return
        nblocks = -(-p.numel() // BLOCK)
        state["m_codes"] = torch.zeros(nblocks * BLOCK, dtype=torch.int8)
        state["m_absmax"] = torch.zeros(nblocks)
        state["v_codes"] = torch.zeros(nblocks * BLOCK, dtype=torch.uint8)
        state["v_absmax"] = torch.zeros(nblocks)

    @staticmethod
    def _moments(state: dict, p: Tensor) -> tuple[Tensor, Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        m = dequantize_blockwise(state["m_codes"], state["m_absmax"], p.shape, BLOCK, True, _M_POWER)
        root_v = dequantize_blockwise(state["v_codes"], state["v_absmax"], p.shape, BLOCK, False, _V_POWER)
        return m, root_v.square_()

    @staticmethod
    def _store(state: dict, m: Tensor, v: Tensor) -> None:
        if "exp_avg" in state:
            return
        state["m_codes"], state["m_absmax"] = quantize_blockwise(m, BLOCK, True, _M_POWER)
        state["v_codes"], state["v_absmax"] = quantize_blockwise(v.sqrt(), BLOCK, False, _V_POWER)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                state["step"] = state["step"] + 1
                t = float(state["step"])
                m, v = self._moments(state, p)
                g = p.grad.float()
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - beta1**t))
                self._store(state, m, v)
        return loss


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (same in every process, unlike hash() of some types)."""
    h = 0
    for v in values:
        h = (h * 1_000_003 + v + 1) % (1 << 63)
    return h


class MeZO(torch.optim.Optimizer):
    """Memory-efficient zeroth-order SGD. `step(closure)` needs a closure that returns the loss (computed
    without autograd) at the current parameters; it is called twice, at theta + eps z and theta - eps z,
    and the parameters move by -lr * g * z with g = (L+ - L-) / (2 eps). z ~ N(0, I) is drawn chunk by
    chunk from generators seeded by (seed, step, parameter, chunk) and drawn again, identically, for each
    use, so no noise tensor outlives a chunk: peak memory stays at inference's."""

    CHUNK = 1 << 20

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.state["mezo"] = {"step": 0}

    def _params(self) -> list[tuple[Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _walk(self, step: int, fn: Callable[[Tensor, Tensor, dict], None]) -> None:
        gen = torch.Generator()
        for i, (p, group) in enumerate(self._params()):
            flat = p.view(-1)
            for c, a in enumerate(range(0, flat.numel(), self.CHUNK)):
                b = min(flat.numel(), a + self.CHUNK)
                gen.manual_seed(_mix(self.seed, step, i, c))
                z = torch.randn(b - a, generator=gen, dtype=torch.float32)
                fn(flat[a:b], z, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        if closure is None:
            raise ValueError("MeZO.step needs a closure returning the loss")
        step = self.state["mezo"]["step"]
        eps = self.param_groups[0]["eps"]
        self._walk(step, lambda x, z, g: x.add_(z.to(x.dtype), alpha=eps))
        loss_plus = float(closure())
        self._walk(step, lambda x, z, g: x.add_(z.to(x.dtype), alpha=-2 * eps))
        loss_minus = float(closure())
        self._walk(step, lambda x, z, g: x.add_(z.to(x.dtype), alpha=eps))
        grad = (loss_plus - loss_minus) / (2 * eps)

        def update(x: Tensor, z: Tensor, group: dict) -> None:
            x.mul_(1 - group["lr"] * group["weight_decay"])
            x.add_(z.to(x.dtype), alpha=-group["lr"] * grad)

        self._walk(step, update)
        self.state["mezo"]["step"] = step + 1
        self.state["mezo"]["projected_grad"] = grad
        return torch.tensor((loss_plus + loss_minus) / 2)
