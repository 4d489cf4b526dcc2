"""Paged attention against plain attention over each request's contiguous keys/values: decodes batched with
padding, chunks with and without cached context, sliding windows, GQA and soft-capping."""

import pytest
import torch

from leanfm.ops.attention import attention, causal_mask
from leanfm.ops.paged_attention import (
    pad_tables,
    paged_attention,
    plan_decodes,
    plan_paged_attention,
    write_kv,
)

BS, HKV, H, D = 4, 2, 4, 8


def reference(q_rows, k_all, v_all, start, n, scale, window, softcap):
    """q_rows (1, H, n, D) at positions [start, start + n) over keys k_all (1, Hkv, start + n, D)."""
    q_pos = torch.arange(start, start + n)[None]
    mask = causal_mask(q_pos, torch.arange(start + n), window)
    return attention(q_rows, k_all, v_all, scale, mask, softcap=softcap)


@pytest.mark.parametrize("window", [None, 5, 9])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("hkv", [HKV, 1, H])
def test_paged_equals_contiguous(window, softcap, hkv):
    g = torch.Generator().manual_seed(0)
    # (start, new tokens): decodes first, then a cold prefill, a chunk after cached context, a long chunk
    reqs = [(13, 1), (0, 1), (30, 1), (0, 11), (9, 6), (21, 12)]
    num_blocks = 64
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # scattered block ids, 0 unused
    tables, next_block = [], 0
    for start, n in reqs:
        nb = -(-(start + n) // BS)
        tables.append(perm[next_block:next_block + nb].tolist())
        next_block += nb
    k_cache = torch.randn(num_blocks, BS, hkv, D, generator=g)
    v_cache = torch.randn(num_blocks, BS, hkv, D, generator=g)
    k_full = [torch.randn(1, hkv, s + n, D, generator=g) for s, n in reqs]  # every position's keys
    v_full = [torch.randn(1, hkv, s + n, D, generator=g) for s, n in reqs]
    for (s, _), t, kf, vf in zip(reqs, tables, k_full, v_full, strict=True):  # the cached context
        for p in range(s):
            k_cache[t[p // BS], p % BS] = kf[0, :, p]
            v_cache[t[p // BS], p % BS] = vf[0, :, p]
    starts, lens = [s for s, _ in reqs], [n for _, n in reqs]
    total = sum(lens)
    q = torch.randn(1, H, total, D, generator=g)
    k_new = torch.cat([kf[:, :, s:] for (s, _), kf in zip(reqs, k_full, strict=True)], dim=2)
    v_new = torch.cat([vf[:, :, s:] for (s, _), vf in zip(reqs, v_full, strict=True)], dim=2)
    row_req = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(lens))
    positions = torch.cat([torch.arange(s, s + n) for s, n in reqs])
    plan = plan_paged_attention(positions, row_req, starts, lens, pad_tables(tables), BS, window)
    assert plan.num_decode == 3
    write_kv(k_cache, v_cache, k_new, v_new, plan.slot_mapping)
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, plan, scale=0.3, softcap=softcap)

    row = 0
    for (s, n), kf, vf in zip(reqs, k_full, v_full, strict=True):
        ref = reference(q[:, :, row:row + n], kf, vf, s, n, 0.3, window, softcap)
        torch.testing.assert_close(out[:, :, row:row + n], ref, rtol=1e-5, atol=1e-5)
        row += n


def test_write_kv_puts_tokens_in_their_slots():
    k_cache, v_cache = torch.zeros(5, BS, 1, 2), torch.zeros(5, BS, 1, 2)
    k = torch.arange(6.0).view(1, 1, 3, 2)
    slots = torch.tensor([3 * BS + 1, 1 * BS + 3, 4 * BS])
    write_kv(k_cache, v_cache, k, -k, slots)
    assert k_cache[3, 1, 0].tolist() == [0.0, 1.0] and k_cache[1, 3, 0].tolist() == [2.0, 3.0]
    assert v_cache[4, 0, 0].tolist() == [-4.0, -5.0]
    assert k_cache.abs().sum() == 15.0


@pytest.mark.parametrize("window,sinks", [(None, 0), (6, 0), (6, 2)])
def test_plan_decodes_equals_the_general_plan(window, sinks):
    starts, tables = [13, 0, 7], [(5, 0, 9, 2), (4,), (8, 3)]  # a dropped block (0) in the first table
    general = plan_paged_attention(torch.tensor(starts), torch.arange(3), starts, [1, 1, 1], pad_tables(tables), 4,
                                   window, sinks)
    fast = plan_decodes(starts, tables, 4, window, sinks)
    assert (fast.num_decode, fast.sinks, fast.block_size, fast.chunks) == (3, general.sinks, 4, [])
    for name in ("slot_mapping", "decode_table", "decode_lo", "decode_hi"):
        a, b = getattr(fast, name), getattr(general, name)
        assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b), name
