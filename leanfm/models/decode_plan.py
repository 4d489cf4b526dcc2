"""One C++ call per decoder block for decode steps (torch.ops.leanfm_kernels.decode_layer).

At batch-1 decode the fixed cost of a PyTorch op (Python, dispatch, allocation) is comparable to the
linear layers of a small quantized model: even with every step a fused kernel (leanfm.models.fusion),
~17 op calls per block cost ~2 ms per token on gemma-3-270m's 18 blocks, against ~7 ms for its int4
linears. `decode_block` runs a whole block (norms, projections, QK-norm, RoPE, KV-cache write,
attention, residuals, gated MLP) in one call, computing what the module path computes (to fp32
rounding; csrc/decode_layer.cpp lists the steps).

It applies when all of these hold, and returns None otherwise (the block then runs its module path):
  * the block is fused (use_fused) and attn_meta is a KVCacheMeta whose float32 caches have room for
    the step; one new token per sequence; x float32 on the CPU; batch <= max_rows(); no autograd;
  * no forward hooks on the block's submodules nor global ones;
  * q/k/v/o/gate/up/down are FastLinear (fp32 or bf16 weight), QuantLinear (4 or 8 bits, groups of a
    multiple of 32) or 2:4 SparseLinear (fp32 or bf16 values, in_features a multiple of 32), in any mix
    (projections sharing an input but not a weight form run as separate kernels in the same call), with
    float32 biases if any; the norms are RMSNorm with one eps and flavour; the MLP's
    activation has a fused kernel (gelu tanh, silu).
The plan (tensor references and settings) is built on the first call and kept on the block; each call
checks by identity that the block still holds the same modules, parameters and buffers (replacing a
layer, compressing, `.to()` all rebuild it) and that no hook was added.

The serving engine's paged cache gets the same one-call block (torch.ops.leanfm_kernels.paged_decode_layer:
csrc/paged_decode_layer.cpp, the paged decode attention kernel inside) when, besides the block's plan:
  * attn_meta offers `paged_decode_args(layer)` (leanfm.engine.attn_meta.PagedAttentionMeta) and it
    gives the layer's (k_cache, v_cache, slots, table, lo, hi): the step is decodes only (no chunk of
    several tokens: prefill, speculative verification), the layer's cache is float32 without int8
    scales, and its KV group is not compressed (no StreamingLLM sinks, no H2O scores);
  * x is (1, R, hidden) float32 on the CPU with R <= max_rows(); no autograd; no global hooks.
LoRA host layers are not plain linears, so their blocks have no plan and run their module path.
"""

from __future__ import annotations

from operator import is_

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from leanfm.models.blocks import RMSNorm
from leanfm.models.interface import KVCacheMeta
from leanfm.models.layers import FastLinear
from leanfm.models.quant_layers import QuantLinear
from leanfm.models.sparse_layers import SparseLinear
from leanfm.ops import kernels as _kernels
from leanfm.ops.kernels import fused
from leanfm.ops.kernels import quant as _quant

__all__ = ["decode_block", "run_layers"]

_FP32 = torch.float32
_KIND = {torch.float32: 0, torch.bfloat16: 1}
_KIND_S24 = {torch.float32: 24, torch.bfloat16: 25}  # 2:4-sparse values (csrc/linear_run.h)
_ACT_SLOT = 19  # index of the int8-activation switch in the plan's ints (read at every call)


class _Plan:
    __slots__ = ("sig", "ok", "tensors", "ints", "floats")

    def __init__(self, sig: list, ok: bool, tensors=None, ints=None, floats=None):
        self.sig, self.ok, self.tensors, self.ints, self.floats = sig, ok, tensors, ints, floats


def _signature(block: nn.Module) -> list | None:
    """The objects the plan depends on, in a fixed order; None when a submodule has a hook."""
    mods = block._modules
    attn, mlp = mods.get("self_attn"), mods.get("mlp")
    if attn is None or mlp is None:
        return None
    sig = []
    for m in (*mods.values(), *attn._modules.values(), *mlp._modules.values()):
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        sig.append(m)
        sig.extend(m._parameters.values())
        sig.extend(m._buffers.values())
    return sig


def _vec_ok(t: Tensor | None) -> bool:
    return t is None or (t.dtype == _FP32 and t.is_cpu and t.dim() == 1 and t.is_contiguous())


def _linear(m: nn.Module) -> tuple[list, list] | None:
    """([weight or codes, scales, zeros, bias], [kind, group_size]) of a projection, or None."""
    bias = m.bias if isinstance(m.bias, Tensor) else None
    if not _vec_ok(bias):
        return None
    if type(m) is FastLinear:
        w = m.weight
        kind = _KIND.get(w.dtype)
        if kind is None or not w.is_cpu or not w.is_contiguous():
            return None
        return [w, None, None, bias], [kind, 0]
    if type(m) is QuantLinear and m.bits in (4, 8) and m.group_size % 32 == 0:
        if not (m.qweight.is_contiguous() and m.scales.is_contiguous() and m.zeros.is_contiguous()):
            return None
        return [m.qweight, m.scales, m.zeros, bias], [m.bits, m.group_size]
    if type(m) is SparseLinear and m.n == 2 and m.m == 4 and m.in_features % 32 == 0:
        v, idx = m.values, m.indices
        kind = _KIND_S24.get(v.dtype)
        if kind is None or not (v.is_cpu and v.is_contiguous() and idx.is_contiguous()):
            return None
        return [v, idx, None, bias], [kind, 0]
    return None


def _build(block: nn.Module, sig: list) -> _Plan:
    mods = block._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    sandwich = "pre_feedforward_layernorm" in mods
    norms = ([mods.get("input_layernorm"), mods.get("post_attention_layernorm"), mods.get("pre_feedforward_layernorm"),
              mods.get("post_feedforward_layernorm")] if sandwich else
             [mods.get("input_layernorm"), None, mods.get("post_attention_layernorm"), None])
    norms += [am.get("q_norm"), am.get("k_norm")]
    present = [n for n in norms if n is not None]
    act = fused.ACTS.get(getattr(mlp, "act_name", None))
    if (act is None or norms[0] is None or norms[2] is None or any(type(n) is not RMSNorm for n in present)
            or len({(n.eps, n.offset) for n in present}) != 1 or not all(_vec_ok(n.weight) for n in present)):
        return _Plan(sig, False)
    tensors, ints = [None if n is None else n.weight for n in norms], []
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        spec = _linear(am[name]) if name in am else None
        if spec is None:
            return _Plan(sig, False)
        tensors += spec[0]
        ints += spec[1]
    for name in ("gate_proj", "up_proj", "down_proj"):
        spec = _linear(mm[name]) if name in mm else None
        if spec is None:
            return _Plan(sig, False)
        tensors += spec[0]
        ints += spec[1]
    eps, offset = present[0].eps, present[0].offset
    ints += [attn.n_heads, attn.n_kv, attn.head_dim, attn.window or -1, act, 0, int(sandwich), int(offset)]
    return _Plan(sig, True, tensors, ints, [float(eps), float(attn.scale), float(attn.softcap or 0.0)])


def _plan(block: nn.Module) -> _Plan | None:
    sig = _signature(block)
    if sig is None:
        return None
    plan = block.__dict__.get("_decode_plan")
    if plan is None or len(plan.sig) != len(sig) or not all(map(is_, sig, plan.sig)):
        plan = _build(block, sig)
        block.__dict__["_decode_plan"] = plan
    return plan if plan.ok else None


def _common_ok(x: Tensor) -> bool:
    """The per-step conditions shared by both caches: kernels on, float32 CPU x, no autograd, no global hooks."""
    settings = _kernels._settings
    if settings is None:
        _kernels.kernels_enabled()  # loads them
        settings = _kernels._settings
    if not settings[0] or x.dim() != 3 or x.dtype != _FP32 or not x.is_cpu:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_forward_hooks_always_called)


def _step_ok(x: Tensor, attn_meta) -> bool:
    """The per-step conditions of the contiguous cache (everything but the block's own plan)."""
    return (type(attn_meta) is KVCacheMeta and _common_ok(x) and x.shape[1] == 1
            and x.shape[0] <= _kernels._settings[1])


def _paged_ok(x: Tensor, attn_meta) -> bool:
    """The per-step conditions of the paged cache (the layer's own are paged_decode_args')."""
    return (getattr(attn_meta, "paged_decode_args", None) is not None and _common_ok(x) and x.shape[0] == 1
            and x.shape[1] <= _kernels._settings[1])


def _block_step(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attn_meta: KVCacheMeta, ns,
                act: int) -> Tensor | None:
    plan = _plan(block)
    if plan is None:
        return None
    cache, start = attn_meta.cache, attn_meta.start
    layer = block._modules["self_attn"].layer_idx
    kc, vc = cache.k[layer], cache.v[layer]
    if start + 1 > cache.max_len or kc.dtype != _FP32 or vc.dtype != _FP32 or kc.shape[0] != x.shape[0]:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in plan.tensors):
        return None
    plan.ints[_ACT_SLOT] = act
    return ns.decode_layer(x, cos, sin, kc, vc, start, plan.tensors, plan.ints, plan.floats)


def _paged_block_step(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attn_meta, ns,
                      act: int) -> Tensor | None:
    plan = _plan(block)
    if plan is None:
        return None
    args = attn_meta.paged_decode_args(block._modules["self_attn"].layer_idx)
    if args is None or args[2].shape[0] != x.shape[1]:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in plan.tensors):
        return None
    plan.ints[_ACT_SLOT] = act
    return ns.paged_decode_layer(x, cos, sin, *args, plan.tensors, plan.ints, plan.floats)


def decode_block(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attn_meta) -> Tensor | None:
    """The block's output for one decode step in one kernel call, or None when that does not apply."""
    ns = fused._ns if fused._ns is not None else fused._load()
    if not ns:
        return None
    if _step_ok(x, attn_meta):
        return _block_step(block, x, cos, sin, attn_meta, ns, _quant.activation_code())
    if _paged_ok(x, attn_meta):
        return _paged_block_step(block, x, cos, sin, attn_meta, ns, _quant.activation_code())
    return None


def run_layers(layers, rope_keys, rope: dict, h: Tensor, positions: Tensor, attn_meta) -> Tensor:
    """h through every block (DecoderForCausalLM.forward's loop): blocks without hooks whose decode step
    applies run it directly (no Module call), the others are called as usual."""
    ns = fused._ns if fused._ns is not None else fused._load()
    step = None
    if ns:
        step = _block_step if _step_ok(h, attn_meta) else _paged_block_step if _paged_ok(h, attn_meta) else None
    act = _quant.activation_code()
    for layer, key in zip(layers, rope_keys, strict=False):
        cos, sin = rope[key]
        y = None
        if step is not None and layer.fused and not (layer._forward_hooks or layer._forward_pre_hooks):
            y = step(layer, h, cos, sin, attn_meta, ns, act)
        h = y if y is not None else layer(h, cos, sin, positions, attn_meta)
    return h
