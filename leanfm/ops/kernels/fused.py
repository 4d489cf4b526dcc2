"""Fused C++ kernels for the decoder's per-token work besides the linear layers, with references.

At batch 1 the linear layers of a small model take a few milliseconds per token; the rest (RMSNorm
in float32 with its casts, RoPE, residual adds, the gated activation, attention over the cache, the
greedy argmax over the vocabulary) took ~11 ms per token as ~550 separate PyTorch ops. Each function
here does one of those steps in one call (csrc/fused_ops.cpp, fused_math.cpp):

    rms_norm(x, w, eps, offset)                 -> y        offset=True is Gemma's (1 + w)
    add_rms_norm(x, a, w1, w2, eps, offset)     -> (h, n)   h = x + norm(a; w1), n = norm(h; w2)
    qk_norm_rope(q, k, wq, wk, cos, sin, eps, offset) -> (q', k')   (B, T, H, D) -> (B, H, T, D)
    rope_cos_sin(positions, inv_freq)           -> (cos, sin)
    gated_act(g, u, act)                        -> act(g) * u  (act: "gelu_pytorch_tanh" or "silu")
    decode_attention(q, k, v, scale, softcap)   -> softmax(q k^T * scale) v, one query position
    argmax(x)                                   -> int64 indices over the last dimension

Each uses the kernel when the kernels are enabled and built (LEANFM_KERNELS, see
leanfm.ops.kernels), every tensor is float32 on the CPU and no autograd is needed; otherwise it
computes its pure-PyTorch reference (the `*_reference` functions, built from leanfm.ops), which is
what the kernels are tested against. Results agree with the references to float32 rounding (the
kernels sum in another order and use a polynomial exp; the gelu is x * sigmoid(2z), the same
function as 0.5 x (1 + tanh z)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leanfm.ops import kernels as _kernels
from leanfm.ops import norm as _norm
from leanfm.ops import rope as _rope
from leanfm.ops.kernels import _build

__all__ = ["ACTS", "add_rms_norm", "argmax", "decode_attention", "gated_act", "qk_norm_rope", "rms_norm",
           "rope_cos_sin"]

ACTS = {"gelu_pytorch_tanh": 0, "silu": 1}  # activations with a fused kernel -> the kernels' code
_FP32 = torch.float32
_ns: object | None = None  # torch.ops.leanfm_kernels, False when unavailable


@torch.compiler.disable
def _load():
    global _ns
    if _ns is None:
        _ns = torch.ops.leanfm_kernels if _build.load() else False
    return _ns


def _ops(*tensors: Tensor | None):
    """The op namespace when the kernels apply to these tensors, else None. Cheapest checks first."""
    if not _kernels.kernels_enabled():
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.dtype != _FP32 or not t.is_cpu or (grad and t.requires_grad)):
            return None
    ns = _ns if _ns is not None else _load()
    return ns or None


# ------------------------------------------------------------------ references
def rms_norm_reference(x: Tensor, w: Tensor, eps: float, offset: bool) -> Tensor:
    return (_norm.rms_norm_offset if offset else _norm.rms_norm)(x, w, eps)


def add_rms_norm_reference(x, a, w1, w2, eps, offset):
    h = x + (a if w1 is None else rms_norm_reference(a, w1, eps, offset))
    return h, (None if w2 is None else rms_norm_reference(h, w2, eps, offset))


def qk_norm_rope_reference(q, k, wq, wk, cos, sin, eps, offset):
    if wq is not None:
        q = rms_norm_reference(q, wq, eps, offset)
    if wk is not None:
        k = rms_norm_reference(k, wk, eps, offset)
    return _rope.apply_rope(q.transpose(1, 2), cos, sin), _rope.apply_rope(k.transpose(1, 2), cos, sin)


def gated_act_reference(g: Tensor, u: Tensor, act: str) -> Tensor:
    if act == "gelu_pytorch_tanh":
        return F.gelu(g, approximate="tanh") * u
    if act == "silu":
        return F.silu(g) * u
    raise ValueError(f"gated_act: no activation {act!r} (known: {sorted(ACTS)})")


def decode_attention_reference(q, k, v, scale, softcap=None):
    """q (B, Hq, 1, D), k / v (B, Hkv, L, D): every key visible (one query after all of them)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


# ------------------------------------------------------------------ dispatch
def rms_norm(x: Tensor, w: Tensor, eps: float, offset: bool) -> Tensor:
    ns = _ops(x, w)
    if ns is None or not w.is_contiguous() or w.dim() != 1:
        return rms_norm_reference(x, w, eps, offset)
    return ns.rms_norm(x, w, eps, offset)


def add_rms_norm(x: Tensor, a: Tensor, w1: Tensor | None, w2: Tensor | None, eps: float,
                 offset: bool) -> tuple[Tensor, Tensor | None]:
    """h = x + rmsnorm(a; w1) (x + a when w1 is None) and n = rmsnorm(h; w2) (None when w2 is None)."""
    ns = _ops(x, a, w1, w2)
    if ns is None or x.shape != a.shape:
        return add_rms_norm_reference(x, a, w1, w2, eps, offset)
    h, n = ns.add_rms_norm(x, a, w1, w2, eps, offset)
    return h, (None if w2 is None else n)


def qk_norm_rope(q: Tensor, k: Tensor, wq: Tensor | None, wk: Tensor | None, cos: Tensor, sin: Tensor,
                 eps: float, offset: bool) -> tuple[Tensor, Tensor]:
    """q (B, T, Hq, D), k (B, T, Hkv, D): per-head RMSNorm (skipped where the weight is None), then RoPE
    with cos / sin (B, T, D). Returns q, k as (B, H, T, D)."""
    ns = _ops(q, k, wq, wk, cos, sin)
    if ns is None or q.stride(-1) != 1 or k.stride(-1) != 1 or q.shape[-1] > 1024 or cos.dim() != 3:
        return qk_norm_rope_reference(q, k, wq, wk, cos, sin, eps, offset)
    return ns.qk_norm_rope(q, k, wq, wk, cos, sin, eps, offset)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """leanfm.ops.rope.rope_cos_sin; the kernel for decode-sized position sets (<= 64 positions)."""
    if dtype != _FP32 or positions.numel() > 64 or _ops(inv_freq) is None or not positions.is_cpu:
        return _rope.rope_cos_sin(positions, inv_freq, dtype)
    return _ns.rope_cos_sin(positions, inv_freq)


def gated_act(g: Tensor, u: Tensor, act: str) -> Tensor:
    code = ACTS.get(act)
    ns = _ops(g, u) if code is not None else None
    if ns is None or g.shape != u.shape:
        return gated_act_reference(g, u, act)
    return ns.gated_act(g, u, code)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None = None) -> Tensor:
    """Attention of one query position per sequence over all of k / v (no mask), GQA by head groups."""
    ns = _ops(q, k, v)
    if (ns is None or q.dim() != 4 or q.shape[2] != 1 or q.stride(-1) != 1 or k.stride(-1) != 1
            or v.stride(-1) != 1 or k.shape != v.shape or k.shape[2] == 0):
        return decode_attention_reference(q, k, v, scale, softcap)
    return ns.decode_attention(q, k, v, scale, softcap or 0.0)


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1) (first index on ties, NaN counts as the largest)."""
    ns = _ops(x)
    if ns is None or x.dim() == 0 or x.shape[-1] == 0:
        return x.argmax(dim=-1)
    return ns.argmax_last(x)
