"""Fast CPU kernels for decode-time linear layers, with torch.nn.functional.linear as the reference.

At batch 1 a linear layer is a matrix-vector product: it reads every weight once and does two flops
per weight, so its speed is the memory bandwidth it reaches. Stock PyTorch reaches about half of the
DRAM bandwidth here; the C++ kernels in csrc/ (AVX2 + FMA; blocking scheme in csrc/blocking.h)
reach most of it.

    from leanfm.ops.kernels import linear
    y = linear(x, weight, bias)        # same contract as F.linear

`linear` uses a kernel when all of these hold, else it calls F.linear:
  * LEANFM_KERNELS is not "0" (read once, see reload_settings), and the library built (on first
    use, see _build.py) on a CPU with AVX2 + FMA;
  * x and weight on the CPU, weight contiguous, no autograd needed (grad mode off, or nothing
    requires grad);
  * dtypes: fp32 x with fp32 weight, or bf16 weight with fp32 or bf16 x (fp32 accumulation);
  * rows = x.numel() // K <= max_rows() (LEANFM_KERNELS_MAX_ROWS, default 32): beyond that the
    problem is compute-bound and the BLAS GEMM catches up. Below 8 rows the kernels are dot-product
    tiles (csrc/blocking.h); from 8 rows on fp32 weights use outer-product tiles over x transposed
    once per call (csrc/skinny_fp32_bcast.cpp). Measured on 2 AVX2 cores (fp32 FMA peak ~167 GFLOP/s),
    GFLOP/s kernel / torch GEMM, best of 5: 16 rows 140/92 (640->2048), 127/74 (2048->640), 130/37
    (gemma's 640->262144 head, streamed from DRAM); 32 rows 136/116, 131/101, 119/47; 64 rows about
    even on the layers (141/127, 135/133), 118/63 on the head. The dot-product tiles did 73-78 at 16 rows.
A non-contiguous x is copied (it is small: rows * K values); a non-contiguous weight falls back.

fp32 x with a bf16 weight is also accepted by the fallback, which computes
F.linear(x, weight.float(), bias.float()) - the reference the kernel is tested against.

Nothing is compiled at `import leanfm`: the library is built or loaded on the first call of
`linear` (or `warmup()`). If it cannot be built, one warning is logged and F.linear is used.

Weight-only quantized (int8, packed int4) layers: `linear_quant` and the storage format in quant.py,
re-exported here.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from leanfm.ops.kernels import _build

__all__ = ["kernels_available", "kernels_enabled", "linear", "linear_quant", "linear_quant_reference",
           "linear_reference", "max_rows", "pack_codes", "reload_settings", "status", "unpack_codes",
           "warmup"]

DEFAULT_MAX_ROWS = 32
_FP32, _BF16 = torch.float32, torch.bfloat16

# Settings from the environment, read once on first use (reload_settings() re-reads them): an
# os.environ lookup costs ~1 us, a noticeable share of a 20 us decode-time linear.
_settings: tuple[bool, int] | None = None
_ops: dict[torch.dtype, object] | None = None  # weight dtype -> torch op, {} if the build failed


def _load_settings() -> None:
    global _settings
    try:
        rows = int(os.environ.get("LEANFM_KERNELS_MAX_ROWS", DEFAULT_MAX_ROWS))
    except ValueError:
        rows = DEFAULT_MAX_ROWS
    _settings = (os.environ.get("LEANFM_KERNELS", "1") != "0", rows)


def reload_settings() -> None:
    """Re-read LEANFM_KERNELS, LEANFM_KERNELS_MAX_ROWS and LEANFM_QUANT_ACT (cached after first use;
    LEANFM_QUANT_ACT replaces a mode set by quant.set_activation_mode)."""
    _load_settings()
    from leanfm.ops.kernels import quant

    quant.set_activation_mode(None)


def kernels_enabled() -> bool:
    """False when the environment variable LEANFM_KERNELS is "0"."""
    if _settings is None:
        _load_settings()
    return _settings[0]


def max_rows() -> int:
    """Largest number of x rows sent to the kernels (LEANFM_KERNELS_MAX_ROWS, default 32)."""
    if _settings is None:
        _load_settings()
    return _settings[1]


@torch.compiler.disable  # file locks and compilers are nothing for dynamo to trace
def _kernel_ops() -> dict[torch.dtype, object]:
    global _ops
    if _ops is None:
        if _build.load():
            ns = torch.ops.leanfm_kernels
            _ops = {_FP32: ns.linear_fp32, _BF16: ns.linear_bf16}  # packets: faster to call than .default
        else:
            _ops = {}
    return _ops


def warmup() -> bool:
    """Build or load the kernel library now instead of on first use. True when usable."""
    return kernels_enabled() and bool(_kernel_ops())


def kernels_available() -> bool:
    """True when `linear` can use the C++ kernels (builds or loads them if not done yet)."""
    return warmup()


def status() -> dict[str, object]:
    """Diagnostics: {"ok", "error", "path"} of the library load, plus "enabled" and "max_rows"."""
    return {"enabled": kernels_enabled(), "max_rows": max_rows(), **_build.status()}


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The pure-PyTorch meaning of `linear`: F.linear, with a bf16 weight upcast for fp32 x."""
    if weight.dtype == _BF16 and x.dtype == _FP32:
        weight = weight.to(_FP32)
        bias = bias.to(_FP32) if bias is not None else None
    return F.linear(x, weight, bias)


def _kernel_for(x: Tensor, weight: Tensor, bias: Tensor | None):
    """The torch op to use for these arguments, or None for the fallback. Cheapest checks first."""
    wdt, xdt = weight.dtype, x.dtype
    if wdt == _FP32:
        if xdt != _FP32 or (bias is not None and bias.dtype != _FP32):
            return None
    elif wdt == _BF16:
        if (xdt != _FP32 and xdt != _BF16) or (bias is not None and bias.dtype != _FP32 and bias.dtype != _BF16):
            return None
    else:
        return None
    if weight.dim() != 2 or x.dim() == 0 or not (x.is_cpu and weight.is_cpu) or not weight.is_contiguous():
        return None
    k = weight.shape[1]
    if x.shape[-1] != k:
        return None  # let F.linear raise its usual error
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > _settings[1]:
        return None
    if bias is not None and (bias.dim() != 1 or not bias.is_cpu):
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return None
    return (_ops if _ops is not None else _kernel_ops()).get(wdt)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias, like F.linear; a C++ kernel for the decode regime (see module doc)."""
    if kernels_enabled():
        op = _kernel_for(x, weight, bias)
        if op is not None:
            return op(x, weight, bias)
    return linear_reference(x, weight, bias)


# after the definitions above: quant.py reads the settings through this module
from leanfm.ops.kernels.quant import (  # noqa: E402
    linear_quant,
    linear_quant_reference,
    pack_codes,
    unpack_codes,
)
