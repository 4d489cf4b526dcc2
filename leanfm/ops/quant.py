"""Integer quantization numerics: pure functions, no module state.

One format serves every weight-only method (RTN, GPTQ, AWQ) and every bit width:

    W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],   g = k // group_size

q are unsigned codes in [0, 2**bits - 1] (uint8 tensors), scales and zeros are fp32 [N, K // group_size].
Per-channel quantization is group_size == K. Symmetric quantization fixes zeros at 2**(bits - 1)
(the codes stay unsigned, so one kernel serves both). Asymmetric zeros are integers in the code range.

Storage packs the codes: 8 bits one per byte, 4 bits two per byte (llama.cpp Q4_0-style nibble layout,
see leanfm.ops.kernels.quant), 3 bits eight codes in three bytes, 2 bits four per byte.

Activations (SmoothQuant W8A8, LLM.int8) use signed symmetric int8 per token: x ~= q * scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PACKABLE_BITS", "check_group_size", "dequantize", "fake_quantize", "pack_bits", "packed_shape",
    "quantize", "quantize_per_token_int8", "quantize_to_codes", "scales_zeros_from_range", "sqnr_db",
    "unpack_bits",
]

PACKABLE_BITS = (2, 3, 4, 8)
_EPS = 1e-12


def check_group_size(k: int, group_size: int | None) -> int:
    """The effective group size (None or -1 -> per channel = k); ValueError when it cannot divide k."""
    if group_size is None or group_size == -1:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {k}; "
                         f"choose a divisor of {k} (or -1 for per-channel)")
    return group_size


def scales_zeros_from_range(wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scales and zeros that map [wmin, wmax] (per group, any shape) onto the codes [0, 2**bits - 1].

    Symmetric (GPTQ's convention): zero fixed at 2**(bits-1), scale = 2 max|w| / qmax (qmax = 2**bits - 1),
    so the levels span -max|w| (1 + 1/qmax) .. max|w| (1 - 1/qmax).
    Asymmetric: the range always contains 0 (so zero is exactly representable); zero is rounded.
    """
    qmax = 2**bits - 1
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        scales = (2 * amax / qmax).clamp_min(_EPS)
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    else:
        wmin = wmin.clamp(max=0)
        wmax = wmax.clamp(min=0)
        scales = ((wmax - wmin) / qmax).clamp_min(_EPS)
        zeros = torch.round(-wmin / scales).clamp(0, qmax)
    return scales.float(), zeros.float()


def _grouped(w: Tensor, group_size: int) -> Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def quantize_to_codes(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Codes of w [N, K] under given per-group scales/zeros [N, G]: round(w / s) + z clamped to the range."""
    g = _grouped(w.float(), group_size)
    q = torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8).reshape(w.shape)


def quantize(
    w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True, clip_ratio: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest quantization of w [N, K] -> (codes uint8 [N, K], scales [N, G], zeros [N, G]).

    clip_ratio < 1 shrinks each group's range before choosing the scale (AWQ's clipping search).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if bits not in range(2, 9):
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    gs = check_group_size(w.shape[1], group_size)
    g = _grouped(w.float(), gs)
    wmin, wmax = g.amin(-1) * clip_ratio, g.amax(-1) * clip_ratio
    scales, zeros = scales_zeros_from_range(wmin, wmax, bits, symmetric)
    return quantize_to_codes(w, scales, zeros, bits, gs), scales, zeros


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Float weight [N, K] from codes [N, K] and per-group scales/zeros [N, G] (group size = K // G)."""
    n, k = q.shape
    gs = k // scales.shape[1]
    g = q.reshape(n, k // gs, gs).float()
    return ((g - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, k).to(dtype)


def fake_quantize(w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  clip_ratio: float = 1.0) -> Tensor:
    """w quantized and dequantized (same dtype): what a quantized layer computes with."""
    q, s, z = quantize(w, bits, group_size, symmetric, clip_ratio)
    return dequantize(q, s, z, w.dtype)


# --- packing -------------------------------------------------------------------------------------
def packed_shape(n: int, k: int, bits: int) -> tuple[int, int]:
    """Shape of the packed uint8 tensor for N x K codes of `bits` bits; ValueError if K does not fit."""
    need = {8: 1, 4: 32, 3: 8, 2: 4}
    if bits not in need:
        raise ValueError(f"{bits}-bit codes cannot be packed; supported widths: {PACKABLE_BITS}")
    if k % need[bits]:
        raise ValueError(f"{bits}-bit packing needs the input width to be a multiple of {need[bits]}, got {k}")
    return n, k * bits // 8


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack codes uint8 [N, K] into bytes (see module docstring for each width's layout)."""
    n, k = q.shape
    packed_shape(n, k, bits)
    q = q.to(torch.uint8)
    if bits in (4, 8):
        from leanfm.ops.kernels.quant import pack_codes

        return pack_codes(q, bits)
    if bits == 2:
        g = q.reshape(n, k // 4, 4)
        return g[..., 0] | (g[..., 1] << 2) | (g[..., 2] << 4) | (g[..., 3] << 6)
    g = q.reshape(n, k // 8, 8).to(torch.int32)  # 3 bits: 8 codes -> one 24-bit little-endian word
    word = sum(g[..., i] << (3 * i) for i in range(8))
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8).reshape(n, k * 3 // 8)


def unpack_bits(packed: Tensor, bits: int, k: int) -> Tensor:
    """Codes uint8 [N, K] from pack_bits' output."""
    n = packed.shape[0]
    if bits in (4, 8):
        from leanfm.ops.kernels.quant import unpack_codes

        return unpack_codes(packed, bits, k)
    if bits == 2:
        p = packed.unsqueeze(-1)
        return torch.cat([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(n, k)
    if bits == 3:
        b = packed.reshape(n, k // 8, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        return torch.stack([(word >> (3 * i)) & 7 for i in range(8)], dim=-1).to(torch.uint8).reshape(n, k)
    raise ValueError(f"{bits}-bit codes cannot be unpacked; supported widths: {PACKABLE_BITS}")


# --- activations ---------------------------------------------------------------------------------
def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 per row of x [..., K] -> (q int8 [..., K], scale fp32 [..., 1])."""
    scale = (x.abs().amax(-1, keepdim=True).float() / 127.0).clamp_min(_EPS)
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
