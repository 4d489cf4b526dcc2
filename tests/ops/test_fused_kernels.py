"""leanfm.ops.kernels.fused: every fused C++ kernel against its pure-PyTorch reference, and the fallback.

Kernel tests build the library on first use (cached afterwards); where it cannot be built they are
skipped with the reason, and only the fallback (the references) is tested.
"""

from __future__ import annotations

import pytest
import torch

from leanfm.ops import kernels
from leanfm.ops.kernels import fused


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("offset", [False, True], ids=["plain", "offset"])
@pytest.mark.parametrize("d", [17, 64, 256, 640])
def test_rms_norm(built, d, offset):
    g = gen(d)
    w = torch.randn(d, generator=g) * 0.3 + (0.0 if offset else 1.0)
    for shape in [(1, d), (3, d), (2, 5, d)]:
        x = torch.randn(*shape, generator=g) * 3
        close(built.rms_norm(x, w, 1e-6, offset), fused.rms_norm_reference(x, w, 1e-6, offset))
    x = torch.randn(d, 4, generator=g).T  # not contiguous
    close(fused.rms_norm(x, w, 1e-6, offset), fused.rms_norm_reference(x, w, 1e-6, offset))


@pytest.mark.parametrize("w1, w2", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("offset", [False, True], ids=["plain", "offset"])
def test_add_rms_norm(built, w1, w2, offset):
    g = gen(1)
    d = 640
    x, a = torch.randn(3, 1, d, generator=g), torch.randn(3, 1, d, generator=g) * 10
    wa = torch.randn(d, generator=g) * 0.3 if w1 else None
    wb = torch.randn(d, generator=g) * 0.3 if w2 else None
    h, n = fused.add_rms_norm(x, a, wa, wb, 1e-6, offset)
    h_ref, n_ref = fused.add_rms_norm_reference(x, a, wa, wb, 1e-6, offset)
    close(h, h_ref)
    assert (n is None) == (n_ref is None)
    if n is not None:
        close(n, n_ref)


@pytest.mark.parametrize("norm", [True, False], ids=["qknorm", "rope_only"])
@pytest.mark.parametrize("b, t, hq, hk, d", [(1, 1, 4, 1, 256), (2, 3, 4, 2, 16), (1, 5, 8, 8, 64), (2, 1, 2, 1, 6)])
def test_qk_norm_rope(built, b, t, hq, hk, d, norm):
    g = gen(d + t)
    proj = torch.randn(b, t, (hq + 2 * hk) * d, generator=g)
    q = proj[..., : hq * d].view(b, t, hq, d)  # strided views of one projection output, as in the model
    k = proj[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
    wq = torch.randn(d, generator=g) * 0.3 if norm else None
    wk = torch.randn(d, generator=g) * 0.3 if norm else None
    pos = torch.arange(100, 100 + t).unsqueeze(0).expand(b, -1)
    cos, sin = _cos_sin(pos, d)
    qo, ko = fused.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6, True)
    q_ref, k_ref = fused.qk_norm_rope_reference(q, k, wq, wk, cos, sin, 1e-6, True)
    assert qo.shape == (b, hq, t, d) and ko.shape == (b, hk, t, d)
    close(qo, q_ref)
    close(ko, k_ref)


def _cos_sin(pos, d):
    from leanfm.ops.rope import rope_cos_sin, rope_inv_freq

    return rope_cos_sin(pos, rope_inv_freq(d, 10000.0), torch.float32)


def test_rope_cos_sin(built):
    from leanfm.ops.rope import rope_cos_sin, rope_inv_freq

    inv = rope_inv_freq(256, 1_000_000.0)
    for pos in (torch.tensor([[0]]), torch.tensor([[7, 8, 9]]), torch.tensor([[31999], [5]])):
        c, s = fused.rope_cos_sin(pos, inv, torch.float32)
        c_ref, s_ref = rope_cos_sin(pos, inv, torch.float32)
        close(c, c_ref, atol=2e-6, rtol=0)
        close(s, s_ref, atol=2e-6, rtol=0)
    long = torch.arange(100).unsqueeze(0)  # beyond the kernel's size: the reference itself
    assert torch.equal(fused.rope_cos_sin(long, inv, torch.float32)[0], rope_cos_sin(long, inv, torch.float32)[0])


@pytest.mark.parametrize("act", sorted(fused.ACTS))
@pytest.mark.parametrize("n", [1, 7, 8, 2048, 2051])
def test_gated_act(built, act, n):
    g = gen(n)
    x = torch.cat([torch.randn(3, n, generator=g) * 4, torch.linspace(-30, 30, n).unsqueeze(0)])
    u = torch.randn(4, n, generator=g)
    close(built.gated_act(x, u, fused.ACTS[act]), fused.gated_act_reference(x, u, act), atol=2e-6, rtol=2e-6)


def test_gated_act_other_activation_falls_back():
    x, u = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="relu6"):
        fused.gated_act(x, u, "relu6")  # no kernel and no reference: callers apply their own act


def test_argmax(built):
    g = gen(3)
    x = torch.randn(3, 262144, generator=g)
    assert torch.equal(built.argmax_last(x), x.argmax(-1))
    x[0, 10] = x[0, 20] = x[0, 5000] = 100.0  # ties: the first index
    x[1, 7] = float("nan")  # NaN counts as the largest, as in torch
    x[2] = float("-inf")
    assert torch.equal(built.argmax_last(x), x.argmax(-1))
    for n in (1, 3, 8, 9, 17):
        y = torch.randn(4, n, generator=g)
        y[0] = 1.0
        assert torch.equal(built.argmax_last(y), y.argmax(-1)), n
    z = torch.randn(5, generator=g).double()  # not float32: torch's argmax
    assert torch.equal(fused.argmax(z), z.argmax(-1))


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("b, hq, hk, d", [(1, 4, 1, 256), (2, 4, 2, 16), (1, 3, 3, 40)])
@pytest.mark.parametrize("length", [1, 9, 300])
def test_decode_attention(built, b, hq, hk, d, length, softcap):
    g = gen(length + d)
    q = torch.randn(b, hq, 1, d, generator=g)
    cache_k, cache_v = torch.randn(2, b, hk, length + 20, d, generator=g)
    k, v = cache_k.narrow(2, 5, length), cache_v.narrow(2, 5, length)  # views into a cache
    out = fused.decode_attention(q, k, v, d**-0.5, softcap)
    assert out.shape == (b, hq, 1, d)
    close(out, fused.decode_attention_reference(q, k, v, d**-0.5, softcap))


def test_fallback_without_kernels(monkeypatch):
    monkeypatch.setenv("LEANFM_KERNELS", "0")
    kernels.reload_settings()
    try:
        x, w = torch.randn(2, 64), torch.randn(64)
        assert torch.equal(fused.rms_norm(x, w, 1e-6, True), fused.rms_norm_reference(x, w, 1e-6, True))
        g, u = torch.randn(2, 64), torch.randn(2, 64)
        assert torch.equal(fused.gated_act(g, u, "silu"), fused.gated_act_reference(g, u, "silu"))
        q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
        assert torch.equal(fused.decode_attention(q, k, v, 0.3), fused.decode_attention_reference(q, k, v, 0.3))
    finally:
        monkeypatch.undo()
        kernels.reload_settings()


def test_autograd_takes_the_reference():
    x = torch.randn(2, 64, requires_grad=True)
    w = torch.randn(64)
    y = fused.rms_norm(x, w, 1e-6, False)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_thread_controller_ops(built):
    stats = built.thread_stats()
    assert len(stats) == 5 and all(isinstance(v, int) for v in stats)
    old = built.set_adaptive_threads(False)
    assert built.thread_stats()[4] == 0
    built.set_adaptive_threads(old)
    assert built.thread_stats()[4] == int(old)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decode_attention_long_context_split(built, threads):
    """Few (sequence, kv head) pairs and many keys: the keys are split across threads (partial softmax
    per range, merged); the result does not depend on the split."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = gen(threads)
        q = torch.randn(1, 4, 1, 256, generator=g)
        k, v = torch.randn(2, 1, 1, 2000, 256, generator=g)
        k[..., 1500, :] = q[0, 0, 0] * 4  # one dominant key in a late range
        for cap in (None, 30.0):
            close(fused.decode_attention(q, k, v, 0.0625, cap), fused.decode_attention_reference(q, k, v, 0.0625, cap))
    finally:
        torch.set_num_threads(old)
