"""GPTQ: second-order weight quantization (Frantar et al. 2022, "GPTQ", Algorithm 1).

For each linear, with H = 2/n sum x^T x over the calibration inputs it sees, the columns of W are
quantized one at a time; each column's rounding error, scaled by the inverse Hessian, is pushed onto
the columns not yet quantized, so that the layer's output error ||X W^T - X Q^T|| stays small:

    U = chol(H^-1)^T (upper)                      # H damped: H + damp * mean(diag H) * I
    for each block of `block_size` columns:        # lazy batch updates
        for column j in the block:
            q_j = quant(w_j);  e_j = (w_j - q_j) / U[j, j]
            W[:, j:block_end] -= e_j U[j, j:block_end]
        W[:, block_end:] -= E_block U[block, block_end:]

Group parameters (scale, zero) are computed when a group starts, from the error-updated weights
(as AutoGPTQ). `act_order` visits columns by decreasing H diagonal; the result is always returned in
the original column order, an ordinary QuantLinear. Dynamic groups under act_order would need a
per-column group index (AutoGPTQ's g_idx), which the one storage format does not have, so with
act_order (and whenever `static_groups` is set) each group's scale/zero is computed up front from the
original weights of that group in the original order ("static groups"). Dead input columns (H[j, j] == 0:
the input is always zero) are quantized as zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, register, set_module
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.quant.layer_groups import collect_input_stats, layerwise_targets
from leanfm.compress.quant.rtn import WeightQuantConfig
from leanfm.models.quant_layers import QuantLinear
from leanfm.ops.quant import check_group_size, scales_zeros_from_range

__all__ = ["GPTQConfig", "apply_gptq", "gptq_quantize", "inverse_hessian_factor"]

_ROW_CHUNK = 8192  # rows of W processed at a time (GPTQ treats rows independently): bounds LM-head memory


@dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig):
    method = "gptq"
    needs_calibration = True

    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (static groups, see docstring)
    damp_percent: float = 0.01  # damping added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy-update block
    static_groups: bool = False  # group scales from the original weights before the loop

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            self._fail(f"damp_percent must be in (0, 1), got {self.damp_percent}; 0.01 is the usual value")
        if self.block_size < 1:
            self._fail(f"block_size must be a positive number of columns, got {self.block_size}; try 128")


def inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, in fp32. Damping grows tenfold (up to
    four times) if the damped H is still not positive definite."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    mean = h.diagonal().mean().clamp_min(1e-12)
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True).float()
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping; "
                     "use more calibration samples or a larger damp_percent")


def _effective_block(block_size: int, gs: int, k: int) -> int:
    """A block size whose blocks hold whole groups (so a group's columns are all error-updated when the
    group starts): a multiple of the group size, or the group size itself when larger."""
    if gs >= k:
        return block_size
    return max(gs, block_size // gs * gs)


def gptq_quantize(
    w: Tensor, H: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
    act_order: bool = False, damp: float = 0.01, block_size: int = 128, static_groups: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of w [N, K] under the Hessian H [K, K] -> (codes uint8 [N, K], scales [N, G], zeros [N, G])
    in leanfm.ops.quant's format, original column order (see the module docstring)."""
    n, k = w.shape
    if H.shape != (k, k):
        raise ValueError(f"gptq_quantize: H must be [{k}, {k}] for w of shape {tuple(w.shape)}, got {tuple(H.shape)}")
    gs = check_group_size(k, group_size)
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = gs == k or static_groups or act_order
    scales = torch.empty(n, k // gs)
    zeros = torch.empty(n, k // gs)
    if static:
        g = W.reshape(n, k // gs, gs)
        scales[:], zeros[:] = scales_zeros_from_range(g.amin(-1), g.amax(-1), bits, symmetric)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    codes = torch.empty(n, k, dtype=torch.uint8)
    group_of = (perm // gs).tolist()
    bs = _effective_block(block_size, gs, k)
    for r in range(0, n, _ROW_CHUNK):
        rows = slice(r, min(r + _ROW_CHUNK, n))
        codes[rows] = _gptq_rows(W[rows], U, scales[rows], zeros[rows], group_of, bits, symmetric, gs,
                                 bs, not static)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous(), scales, zeros


def _gptq_rows(W: Tensor, U: Tensor, scales: Tensor, zeros: Tensor, group_of: list[int], bits: int,
               symmetric: bool, gs: int, bs: int, dynamic: bool) -> Tensor:
    """Algorithm 1 on a block of rows (W is modified; scales/zeros filled in when `dynamic`).
    Returns the codes in the (possibly permuted) column order of W."""
    n, k = W.shape
    qmax = 2**bits - 1
    codes = torch.empty(n, k, dtype=torch.uint8)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.empty_like(W1)
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if dynamic and j % gs == 0:
                grp = W1[:, i:i + gs]
                scales[:, g], zeros[:, g] = scales_zeros_from_range(grp.amin(1), grp.amax(1), bits, symmetric)
            s, z = scales[:, g], zeros[:, g]
            col = W1[:, i]
            q = torch.round(col / s).add_(z).clamp_(0, qmax)
            Q1[:, i] = q
            err = (col - (q - z) * s).div_(U1[i, i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        codes[:, i1:i2] = Q1.to(torch.uint8)
        if i2 < k:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return codes


@register(GPTQConfig)
def apply_gptq(model: nn.Module, config: GPTQConfig, ctx: CompressContext) -> dict:
    """Quantize every targeted linear (decoder layers, and the LM head when included) with GPTQ,
    layer by layer on the calibration tokens; later layers calibrate on the quantized layers' outputs."""
    targets = {name: (module, cfg) for name, module, cfg in ctx.targets((nn.Linear,))}
    n_layers = len(model.model.layers)
    by_step = layerwise_targets("gptq", targets, n_layers)
    tokens = ctx.require_calibration()
    walk = LayerwiseCalibration(model, tokens, include_head=n_layers in by_step)
    bits_total = weights = 0
    last = max(by_step, default=-1)
    for step in ctx.bar(walk, "gptq"):
        names = by_step.get(step.index, [])
        if names:
            stats = collect_input_stats(step, names)
            for rel in names:
                full = rel if step.is_head else f"{step.prefix}.{rel}"
                module, cfg = targets[full]
                codes, s, z = gptq_quantize(module.weight, stats[rel].hessian(), cfg.bits, cfg.effective_group,
                                            cfg.symmetric, cfg.act_order, cfg.damp_percent, cfg.block_size,
                                            cfg.static_groups)
                new = QuantLinear.from_codes(codes, s, z, cfg.bits, module.bias)
                set_module(model, full, new)
                bits_total += new.weight_bits * codes.numel()
                weights += codes.numel()
            del stats
        if step.index >= last:
            break
    return {"modules": len(targets), "bits_per_weight": round(bits_total / max(weights, 1), 3),
            "calibration_tokens": int(tokens.numel())}
