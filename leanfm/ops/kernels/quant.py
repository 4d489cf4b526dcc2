"""Weight-only quantized linear layers (int8 and packed int4) with C++ kernels for decode.

Storage format (shared with the quantizers and QuantLinear; fixed). A weight W (N, K) = (out, in)
is kept as unsigned codes q[n, k] in [0, 2**bits - 1] with fp32 `scales` and `zeros` of shape
(N, G), G = K // group_size (group_size divides K; per-channel is group_size == K):

    W[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

zeros are integer-valued floats (symmetric quantization: zeros = 2**(bits - 1)).
  * bits=8: qweight uint8 (N, K), one code per byte.
  * bits=4: qweight uint8 (N, K // 2), K % 32 == 0, llama.cpp Q4_0-style nibbles per block of 32
    codes along K: qweight[n, 16b + j] = q[n, 32b + j] | q[n, 32b + 16 + j] << 4, j < 16.

    from leanfm.ops.kernels.quant import linear_quant, pack_codes
    y = linear_quant(x, qweight, scales, zeros, bits=4, group_size=32, bias=None)

`linear_quant` uses the C++ kernel (csrc/skinny_q8.cpp, skinny_q4.cpp) when all of these hold:
  * the kernels are enabled and built (same switches as `leanfm.ops.kernels.linear`);
  * everything on the CPU, qweight contiguous, no autograd needed;
  * bits 4 or 8, group_size % 32 == 0 (hence K % 32 == 0), x fp32 or bf16, scales/zeros fp32;
  * rows = x.numel() // K <= max_rows().
The kernel reads only the codes, scales and zeros (0.5 or 1 byte per weight + 8 bytes per group),
accumulates in fp32 and returns x's dtype. Otherwise (prefill, odd shapes, no kernels) it
dequantizes W once per call, in chunks of rows to bound the temporary memory, and uses F.linear:
the dequantization is N*K work against the GEMM's M*N*K (one pass in C++, csrc/dequant.cpp, when
the library is built). In that path fp32 x uses an fp32 W; a bf16 x uses W rounded to bf16 (the
GEMM runs in bf16, like an unquantized bf16 model's).

`linear_quant_reference` is the meaning the kernel is tested against: dequantize to fp32,
F.linear in fp32, cast to x's dtype.

Activation mode (LEANFM_QUANT_ACT, or set_activation_mode). It holds for every row count: the
fallback path rounds x the same way before its GEMM (when K % 32 == 0), so a request's result does
not depend on whether its rows went through the kernel (decode) or the GEMM (prefill). Where autograd
records through x (training adapters on a quantized base) x stays fp32, as rounding has no gradient:
  * "fp32": x as is; codes are converted to floats and multiplied in fp32 (compute-bound, ~15 GB/s).
  * "int8": x quantized once per call to int8 per block of 32 values (llama.cpp's Q8_0 for
    activations: scale = max|x| / 127, codes round(x / scale)), then integer dot products with the
    weight codes and one float fma per 32 codes. Its meaning: linear_quant_reference(...,
    act="int8"), i.e. the fp32 product of W with quantize_activations_q8(x).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from leanfm.ops import kernels as _kernels
from leanfm.ops.kernels import _build

__all__ = ["ACT_MODES", "activation_mode", "dequantize", "linear_quant", "linear_quant_reference", "pack_codes",
           "quantize_activations_q8", "set_activation_mode", "unpack_codes"]


ACT_MODES = ("fp32", "int8")  # index = the kernels' `act` code
DEFAULT_ACT = "fp32"

_FP32, _BF16, _U8 = torch.float32, torch.bfloat16, torch.uint8
_CHUNK_WEIGHTS = 1 << 22  # dequantize at most this many weights at a time (16 MB of fp32)
_qops: dict[int, object] | None = None  # bits -> torch op, {} if the library is unavailable
_act: int | None = None  # the activation mode's code, read from LEANFM_QUANT_ACT on first use


def activation_code() -> int:
    """0 ("fp32") or 1 ("int8"): the activation mode of the decode kernels (see the module doc)."""
    global _act
    if _act is None:
        mode = os.environ.get("LEANFM_QUANT_ACT", DEFAULT_ACT)
        _act = ACT_MODES.index(mode) if mode in ACT_MODES else ACT_MODES.index(DEFAULT_ACT)
    return _act


def activation_mode() -> str:
    return ACT_MODES[activation_code()]


def set_activation_mode(mode: str | None) -> str:
    """Set the activation mode ("fp32" or "int8"; None re-reads LEANFM_QUANT_ACT). Returns the old one."""
    global _act
    old = activation_mode()
    if mode is not None and mode not in ACT_MODES:
        raise ValueError(f"activation mode must be one of {ACT_MODES}, got {mode!r}")
    _act = None if mode is None else ACT_MODES.index(mode)
    return old


def quantize_activations_q8(x: Tensor) -> Tensor:
    """x with every block of 32 values along the last dimension rounded to int8 codes times a scale
    (max|block| / 127), in fp32: what the "int8" kernels multiply W with. Last dimension % 32 == 0."""
    xf = x.float()
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(b * inv).clamp(-127, 127) * d).reshape(xf.shape)


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Codes q (N, K) uint8 in [0, 2**bits) -> qweight in the storage layout (see module doc)."""
    if q.dtype != _U8 or q.dim() != 2:
        raise ValueError(f"pack_codes: q must be a 2-D uint8 tensor, got {q.dtype} {tuple(q.shape)}")
    if bits == 8:
        return q.contiguous()
    if bits != 4:
        raise ValueError(f"pack_codes: bits must be 4 or 8, got {bits}")
    n, k = q.shape
    if k % 32:
        raise ValueError(f"pack_codes: 4-bit packing needs K % 32 == 0, got K={k}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError("pack_codes: 4-bit codes must be in [0, 15]")
    blocks = q.reshape(n, k // 32, 2, 16)  # [..., 0, j] = code 32b + j, [..., 1, j] = code 32b + 16 + j
    return ((blocks[:, :, 0] & 0x0F) | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_codes(qweight: Tensor, bits: int, K: int) -> Tensor:
    """qweight in the storage layout -> codes (N, K) uint8; the inverse of pack_codes."""
    if qweight.dtype != _U8 or qweight.dim() != 2:
        raise ValueError(
            f"unpack_codes: qweight must be 2-D uint8, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    if bits == 8:
        if qweight.shape[1] != K:
            raise ValueError(f"unpack_codes: 8-bit qweight of shape {tuple(qweight.shape)} for K={K}")
        return qweight
    if bits != 4:
        raise ValueError(f"unpack_codes: bits must be 4 or 8, got {bits}")
    if K % 32 or qweight.shape[1] * 2 != K:
        raise ValueError(f"unpack_codes: 4-bit qweight of shape {tuple(qweight.shape)} for K={K}")
    blocks = qweight.reshape(n, K // 32, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, K)


def dequantize(
    qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, dtype: torch.dtype = _FP32
) -> Tensor:
    """W (N, K) = (q - zeros) * scales per group, computed in fp32 and returned as `dtype`."""
    n, g = scales.shape
    k = g * group_size
    q = unpack_codes(qweight, bits, k).reshape(n, g, group_size)
    w = (q.to(_FP32) - zeros.to(_FP32).unsqueeze(-1)) * scales.to(_FP32).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def linear_quant_reference(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    act: str = "fp32",
) -> Tensor:
    """The meaning of linear_quant: F.linear in fp32 with the dequantized W (and x quantized per block
    of 32 when act="int8"), cast to x's dtype."""
    w = dequantize(qweight, scales, zeros, bits, group_size)
    b = None if bias is None else bias.to(_FP32)
    xf = quantize_activations_q8(x) if act == "int8" else x.to(_FP32)
    return F.linear(xf, w, b).to(x.dtype)


def _fast_prefill_ops(x: Tensor, qweight: Tensor, bits: int, group_size: int):
    """The C++ dequantize / activation-rounding ops (csrc/dequant.cpp) when they apply, else None."""
    if (bits != 4 and bits != 8) or group_size % 32 or qweight.dtype != _U8 or not _kernels.kernels_enabled():
        return None
    if not (x.is_cpu and qweight.is_cpu) or (torch.is_grad_enabled() and x.requires_grad):
        return None
    from leanfm.ops.kernels import fused  # holds the op namespace, loaded once for all kernel modules

    return (fused._ns if fused._ns is not None else fused._load()) or None


def _dequant_linear(x, qweight, scales, zeros, bits, group_size, bias):
    """F.linear with W dequantized to x's dtype (fp32 for other dtypes), in chunks of rows; with int8
    activations (and K % 32 == 0) x is first rounded as the decode kernels round it, so a row's result
    does not depend on how many rows share the call."""
    dtype = x.dtype if x.dtype in (_FP32, _BF16) else _FP32
    ns = _fast_prefill_ops(x, qweight, bits, group_size)
    training = torch.is_grad_enabled() and x.requires_grad  # rounding has no gradient: keep fp32 there
    int8_act = (_act if _act is not None else activation_code()) == 1 and x.shape[-1] % 32 == 0 and not training
    if int8_act:
        xd = (ns.quantize_act_q8(x) if ns is not None else quantize_activations_q8(x)).to(dtype)
    else:
        xd = x.to(dtype)
    bd = None if bias is None else bias.to(dtype)

    def weight(i, j):
        if ns is not None and not scales.requires_grad and not zeros.requires_grad:
            return ns.dequantize_weight(qweight[i:j], scales[i:j], zeros[i:j], bits, group_size).to(dtype)
        return dequantize(qweight[i:j], scales[i:j], zeros[i:j], bits, group_size, dtype)

    n, g = scales.shape
    chunk = max(1, _CHUNK_WEIGHTS // max(1, g * group_size))
    if n <= chunk:
        y = F.linear(xd, weight(0, n), bd)
    else:
        parts = []
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            parts.append(F.linear(xd, weight(i, j), None if bd is None else bd[i:j]))
        y = torch.cat(parts, dim=-1)
    return y.to(x.dtype)


@torch.compiler.disable
def _quant_ops() -> dict[int, object]:
    global _qops
    if _qops is None:
        if _build.load():
            ns = torch.ops.leanfm_kernels
            _qops = {8: ns.linear_q8, 4: ns.linear_q4}
        else:
            _qops = {}
    return _qops


def _kernel_for(x, qweight, scales, zeros, bits, group_size, bias):
    """The torch op for these arguments, or None for the fallback. Cheapest checks first."""
    if (bits != 4 and bits != 8) or group_size % 32 or qweight.dtype != _U8:
        return None
    if (x.dtype != _FP32 and x.dtype != _BF16) or scales.dtype != _FP32 or zeros.dtype != _FP32:
        return None
    if x.dim() == 0 or not (x.is_cpu and qweight.is_cpu and scales.is_cpu and zeros.is_cpu):
        return None
    k = x.shape[-1]
    if k == 0 or k % group_size or qweight.dim() != 2 or qweight.shape[1] * 8 != k * bits:
        return None
    if not qweight.is_contiguous() or scales.shape != (qweight.shape[0], k // group_size):
        return None
    rows = x.numel() // k
    if rows == 0 or rows > _kernels.max_rows():
        return None
    if bias is not None and (bias.dim() != 1 or not bias.is_cpu or bias.dtype not in (_FP32, _BF16)):
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad
        or scales.requires_grad
        or zeros.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        return None
    return (_qops if _qops is not None else _quant_ops()).get(bits)


def linear_quant(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W.T + bias for a weight-only quantized W (format and dispatch: module doc)."""
    if _kernels.kernels_enabled():
        op = _kernel_for(x, qweight, scales, zeros, bits, group_size, bias)
        if op is not None:
            return op(x, qweight, scales, zeros, group_size, bias, _act if _act is not None else activation_code())
    return _dequant_linear(x, qweight, scales, zeros, bits, group_size, bias)
