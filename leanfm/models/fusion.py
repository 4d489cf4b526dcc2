"""Decode-time fusion of the decoder blocks' steps, decided per call from the modules at hand.

Opt-in per model: `use_fused(model)` (done by leanfm.engine.runtime.prepare_for_inference) sets the
`fused` flag of its blocks, attentions, MLPs, norms and of the model itself; unset, the model is plain
PyTorch (bit-exact with LEANFM_KERNELS=0). With the flag, the modules call these helpers instead of
their submodules one by one; each computes what the submodules would (to float32 rounding) and falls
back to calling them when it cannot fuse:

    q, k, v = linears(x, attn.q_proj, attn.k_proj, attn.v_proj)   # one kernel call, one barrier
    h = gated_mlp_hidden(mlp, x)                                   # act(gate(x)) * up(x), one call
    h, n = add_norm(x, a, post_norm, next_norm)                    # residual add + RMSNorm(s)
    q, k = norm_rope(attn, q, k, cos, sin)                         # QK-norm + RoPE, (B, H, T, D)
    out = attention(q, k, v, scale, mask, ...)                     # decode: one C++ call

Fusing needs: no forward hooks on the modules involved (calibration hooks, e.g.; global hooks
included) and the kernels' conditions (leanfm.ops.kernels, leanfm.ops.kernels.fused: float32 CPU
tensors, no autograd, decode-sized inputs). Linear layers fuse when they are all FastLinear with one
weight dtype, or all QuantLinear with one bits / group_size in {4, 8} x multiples of 32; any other
form (low-rank, sparse, LoRA, plain nn.Linear...) runs its own forward; a multi-LoRA host layer
(leanfm.models.multi_lora) counts as its base form in steps where none of its adapters has rows. Module names and state dicts
are untouched: fusion is a property of the forward pass only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from leanfm.models.layers import FastLinear
from leanfm.models.multi_lora import MultiLoraHost
from leanfm.models.quant_layers import QuantLinear
from leanfm.ops import kernels as _kernels
from leanfm.ops.attention import attention as _attention
from leanfm.ops.kernels import fused
from leanfm.ops.kernels import quant as _quant

__all__ = ["add_norm", "attention", "gated_mlp_hidden", "linears", "norm_rope", "use_fused"]

_FP32 = torch.float32


def _hookless(*mods: nn.Module | None) -> bool:
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_forward_hooks_always_called):
        return False
    return all(m is None or not (m._forward_hooks or m._forward_pre_hooks) for m in mods)


def _kind(m: nn.Module) -> type:
    """The layer's class; a multi-LoRA host that adds nothing this step counts as its base class."""
    t = type(m)
    if issubclass(t, MultiLoraHost) and m.lora_idle():
        return t.__bases__[1]
    return t


def _group_call(x: Tensor, mods: tuple[nn.Module, ...], epilogue: int) -> list[Tensor] | None:
    """One kernel call for all `mods` on x (epilogue -1: one output each; 0/1: gated), or None."""
    if x.dtype != _FP32 or not x.is_cpu or x.dim() == 0 or not _kernels.kernels_enabled():
        return None
    k = x.shape[-1]
    if k == 0 or x.numel() // k > _kernels.max_rows() or not _hookless(*mods):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(
            isinstance(getattr(m, "bias", None), Tensor) and m.bias.requires_grad for m in mods)):
        return None
    kind = _kind(mods[0])
    if any(_kind(m) is not kind for m in mods):
        return None
    ns = fused._ops()
    if ns is None:
        return None
    if kind is FastLinear:
        ws = [m.weight for m in mods]
        dt = ws[0].dtype
        if dt not in (_FP32, torch.bfloat16) or any(
                w.dtype != dt or not w.is_contiguous() or not w.is_cpu or w.requires_grad for w in ws):
            return None
        return ns.linear_group(x, ws, [m.bias for m in mods], epilogue)
    if kind is QuantLinear:
        bits, gs = mods[0].bits, mods[0].group_size
        if bits not in (4, 8) or gs % 32 or k % gs or any(
                m.bits != bits or m.group_size != gs or not m.qweight.is_contiguous() for m in mods):
            return None
        return ns.linear_group_quant(x, [m.qweight for m in mods], [m.scales for m in mods],
                                     [m.zeros for m in mods], bits, gs, [m.bias for m in mods], epilogue,
                                     _quant.activation_code())
    return None


def linears(x: Tensor, *mods: nn.Module) -> list[Tensor]:
    """[m(x) for m in mods], in one kernel call when they fuse."""
    out = _group_call(x, mods, -1) if len(mods) > 1 else None
    return out if out is not None else [m(x) for m in mods]


def gated_mlp_hidden(mlp: nn.Module, x: Tensor) -> Tensor:
    """act(mlp.gate_proj(x)) * mlp.up_proj(x) (the input of down_proj)."""
    code = fused.ACTS.get(mlp.act_name)
    if code is not None:
        out = _group_call(x, (mlp.gate_proj, mlp.up_proj), code)
        if out is not None:
            return out[0]
        return fused.gated_act(mlp.gate_proj(x), mlp.up_proj(x), mlp.act_name)
    return mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)


def _norm_args(*norms: nn.Module | None):
    """(weights, eps, offset) of RMSNorm modules sharing eps and offset, or None."""
    mods = [n for n in norms if n is not None]
    if not mods or not _hookless(*mods):
        return None
    eps, offset = mods[0].eps, mods[0].offset
    if any(n.eps != eps or n.offset != offset for n in mods):
        return None
    return [None if n is None else n.weight for n in norms], eps, offset


def add_norm(x: Tensor, a: Tensor, post: nn.Module | None, nxt: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """h = x + post(a) (x + a when post is None) and nxt(h) (None when nxt is None)."""
    args = _norm_args(post, nxt)
    if args is None:
        h = x + (a if post is None else post(a))
        return h, (None if nxt is None else nxt(h))
    (w1, w2), eps, offset = args
    return fused.add_rms_norm(x, a, w1, w2, eps, offset)


def norm_rope(attn: nn.Module, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, T, Hq, D), k (B, T, Hkv, D) -> QK-norm (if the attention has one), RoPE, (B, H, T, D)."""
    qn, kn = attn.q_norm, attn.k_norm
    if qn is None:
        return fused.qk_norm_rope(q, k, None, None, cos, sin, 0.0, False)
    args = _norm_args(qn, kn)
    if args is None:
        q, k = qn(q), kn(k)
        return fused.qk_norm_rope_reference(q, k, None, None, cos, sin, 0.0, False)
    (wq, wk), eps, offset = args
    return fused.qk_norm_rope(q, k, wq, wk, cos, sin, eps, offset)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, is_causal: bool = False,
              softcap: float | None = None) -> Tensor:
    """leanfm.ops.attention.attention; one query position without a mask goes to the decode kernel."""
    if q.shape[2] == 1 and mask is None and (not is_causal or k.shape[2] == 1):
        return fused.decode_attention(q, k, v, scale, softcap)
    return _attention(q, k, v, scale, mask, is_causal=is_causal, softcap=softcap)


def use_fused(model: nn.Module, on: bool = True) -> int:
    """Set (or clear) the `fused` flag of every module of `model` that has one; returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(type(m), "fused"):
            m.fused = on
            n += 1
    return n
