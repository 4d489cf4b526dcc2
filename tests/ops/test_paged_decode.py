"""The C++ paged decode kernel against its PyTorch reference (fp32 / bf16 / int8 caches, GQA, windows,
sinks with their own query, soft-capping, H2O scores, block boundaries, split-K), the reference against
plain attention, and int8 KV quantization's error."""

import pytest
import torch

from leanfm.ops import kernels
from leanfm.ops.attention import attention
from leanfm.ops.kernels.attention import paged_decode, paged_decode_available
from leanfm.ops.kv_quant import dequantize_kv, quantize_kv
from leanfm.ops.paged_reference import decode_reference

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def built():
    if not kernels.kernels_enabled():
        pytest.skip("leanfm C++ kernels disabled by LEANFM_KERNELS=0")
    if not paged_decode_available():
        pytest.skip(f"leanfm C++ kernels unavailable: {kernels.status().get('error')}")


def make_case(lens, hkv, h, d, bs, dtype, seed=0, window=None, extra_blocks=3):
    """Scattered block tables for requests of the given key counts; caches of `dtype` (int8 with scales)."""
    g = torch.Generator().manual_seed(seed)
    nb_req = [-(-n // bs) for n in lens]
    num_blocks = sum(nb_req) + extra_blocks
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables, i = [], 0
    for n in nb_req:
        tables.append(perm[i:i + n])
        i += n
    width = max(nb_req) + 1  # a padding column, like the engine's padded tables
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    kf = torch.randn(num_blocks, bs, hkv, d, generator=g)
    vf = torch.randn(num_blocks, bs, hkv, d, generator=g)
    cache = dict(k_scale=None, v_scale=None)
    if dtype == torch.int8:
        k, cache["k_scale"] = quantize_kv(kf)
        v, cache["v_scale"] = quantize_kv(vf)
    else:
        k, v = kf.to(dtype), vf.to(dtype)
    hi = torch.tensor(lens)
    lo = (hi - window).clamp(min=0) if window else torch.zeros_like(hi)
    q = torch.randn(len(lens), h, d, generator=g)
    return q, k, v, table, lo, hi, cache


def assert_kernel_matches(q, k, v, table, lo, hi, cache, scale=0.2, **kw):
    score = kw.pop("score", None)
    s1 = None if score is None else score.clone()
    s2 = None if score is None else score.clone()
    out = paged_decode(q, k, v, table, lo, hi, scale, k_scale=cache["k_scale"], v_scale=cache["v_scale"], score=s1, **kw)
    ref = decode_reference(q, k, v, table, lo, hi, scale, k_scale=cache["k_scale"], v_scale=cache["v_scale"], score=s2,
                           **kw)
    assert out is not None and out.dtype == q.dtype and out.shape == q.shape
    tol = 1e-2 if q.dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    if score is not None:
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv,h", [(1, 4), (2, 4), (4, 4), (2, 16), (1, 3)])
def test_kernel_equals_reference_gqa(built, dtype, hkv, h):
    # lengths on and around block boundaries (bs 4), a 1-key request, many requests
    lens = [1, 3, 4, 5, 8, 9, 16, 17, 31, 40, 2, 12]
    case = make_case(lens, hkv, h, 16, 4, dtype, seed=hkv * 10 + h)
    if h // hkv > 8:  # beyond the kernel's group limit: it declines, the caller falls back
        assert paged_decode(*case[:6], 0.2, **case[6]) is None
        return
    assert_kernel_matches(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_kernel_windows_and_softcap(built, dtype, window, softcap):
    case = make_case([3, 7, 20, 33, 64], 2, 4, 32, 8, dtype, window=window, seed=window)
    assert_kernel_matches(*case, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_sinks_with_their_own_query(built, dtype):
    q, k, v, table, lo, hi, cache = make_case([6, 30, 45, 70], 1, 4, 16, 4, dtype, window=10, seed=3)
    q_sink = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    assert_kernel_matches(q, k, v, table, lo, hi, cache, sinks=3, q_sink=q_sink)
    assert_kernel_matches(q, k, v, table, lo, hi, cache, sinks=5)  # q scores the sinks too


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_accumulates_h2o_scores(built, dtype):
    q, k, v, table, lo, hi, cache = make_case([5, 13, 27], 2, 4, 16, 4, dtype, seed=4)
    score = torch.rand(k.shape[:3], generator=torch.Generator().manual_seed(1))
    assert_kernel_matches(q, k, v, table, lo, hi, cache, score=score)
    fresh = torch.zeros(k.shape[:3])
    paged_decode(q, k, v, table, lo, hi, 0.2, k_scale=cache["k_scale"], v_scale=cache["v_scale"], score=fresh)
    # each query head's probabilities sum to 1: a kv head's keys collect G = 2 per request
    assert fresh.sum().item() == pytest.approx(3 * 4, rel=1e-5)


def test_kernel_split_k_long_context(built):
    """One or two requests with long contexts: the keys are split across parts and merged."""
    torch.set_num_threads(2)
    try:
        for dtype in DTYPES:
            case = make_case([2000, 1500], 1, 4, 64, 16, dtype, seed=5, window=1700)
            assert_kernel_matches(*case)
    finally:
        torch.set_num_threads(1)


def test_kernel_bf16_query(built):
    q, k, v, table, lo, hi, cache = make_case([9, 21], 2, 4, 16, 4, torch.bfloat16, seed=6)
    assert_kernel_matches(q.bfloat16(), k, v, table, lo, hi, cache)


@pytest.mark.parametrize("hkv", [1, 2])
def test_reference_equals_plain_attention(hkv):
    lens, window = [7, 19, 30], 12
    q, k, v, table, lo, hi, cache = make_case(lens, hkv, 4, 8, 4, torch.float32, window=window, seed=7)
    out = decode_reference(q, k, v, table, lo, hi, 0.3)
    for r, n in enumerate(lens):
        blocks = table[r, :-(-n // 4)]
        kr = k[blocks].reshape(-1, hkv, 8)[:n].transpose(0, 1)[None]  # (1, Hkv, n, D)
        vr = v[blocks].reshape(-1, hkv, 8)[:n].transpose(0, 1)[None]
        mask = torch.zeros(1, 1, 1, n, dtype=torch.bool)
        mask[..., max(0, n - window):] = True
        ref = attention(q[r][None, :, None], kr, vr, 0.3, mask)
        torch.testing.assert_close(out[r], ref[0, :, 0], rtol=1e-5, atol=1e-5)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()).item()


def test_int8_quantization_error_bound():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (50, 3)
    err = (dequantize_kv(q, s) - x).abs()
    assert (err <= s[..., None] / 2 + 1e-6).all()
    assert quantize_kv(torch.zeros(2, 8))[0].abs().sum() == 0


def test_int8_cache_attention_close_to_fp32():
    """Attention over int8 K/V against the same keys in fp32: SQNR above 35 dB (int8 rows: ~40 dB each)."""
    case = make_case([40, 100, 7, 64], 1, 4, 64, 16, torch.float32, seed=8)
    q, k, v, table, lo, hi, _ = case
    kq, ks = quantize_kv(k)
    vq, vs = quantize_kv(v)
    ref = decode_reference(q, k, v, table, lo, hi, 0.125)
    out = decode_reference(q, kq, vq, table, lo, hi, 0.125, k_scale=ks, v_scale=vs)
    assert sqnr_db(ref, out) > 35
    fast = paged_decode(q, kq, vq, table, lo, hi, 0.125, k_scale=ks, v_scale=vs)
    if fast is not None:
        assert sqnr_db(ref, fast) > 35
