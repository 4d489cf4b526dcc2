"""segmented_lora_add_ (each adapter's rows through its factors, added in place) against a row-by-row oracle."""

import pytest
import torch

from leanfm.ops.lora import LoraFactors, RowGroup, lora_rows_reference, segmented_lora_add_


def test_ranges_and_index_groups_match_the_row_oracle():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(9, 16, generator=g), torch.randn(9, 12, generator=g)
    f1 = LoraFactors(torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), 2.0)
    f2 = LoraFactors(torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.5)
    rows = [f1, f1, f1, None, f2, None, f2, f2, None]
    groups = [(RowGroup(1, 0, 3), f1), (RowGroup(2, index=torch.tensor([4, 6, 7])), f2)]
    got = segmented_lora_add_(out.clone(), x, groups)
    torch.testing.assert_close(got, lora_rows_reference(out, x, rows))
    assert torch.equal(got[[3, 5, 8]], out[[3, 5, 8]])  # rows without an adapter are the base output


def test_bf16_output_gets_a_float32_delta_cast_once():
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 8, generator=g).bfloat16(), torch.randn(3, 5, generator=g).bfloat16()
    f = LoraFactors(torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g), 1.0)
    got = segmented_lora_add_(out.clone(), x, [(RowGroup(1, 0, 3), f)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, lora_rows_reference(out, x, [f] * 3))


def test_factor_shapes_are_checked():
    with pytest.raises(ValueError, match="A \\(r, in\\) and B \\(out, r\\)"):
        LoraFactors(torch.zeros(4, 8), torch.zeros(5, 3), 1.0)


def test_stacked_adapters_with_a_row_mask_match_the_row_oracle():
    from leanfm.ops.lora import row_lora_ids, rows_mask, stack_lora, stacked_lora_add_

    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)
    f = {3: LoraFactors(torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), 2.0),
         7: LoraFactors(torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.5),
         9: LoraFactors(torch.randn(1, 16, generator=g), torch.randn(12, 1, generator=g), 1.5)}  # in no row
    groups = [RowGroup(7, 0, 2), RowGroup(3, index=torch.tensor([3, 5, 6]))]
    ids = row_lora_ids(groups, 8)
    assert ids.tolist() == [7, 7, 0, 3, 0, 3, 3, 0]
    stacked = stack_lora(f)
    assert stacked.a.shape == (7, 16) and stacked.b_t.shape == (7, 12) and stacked.ids.tolist() == [3] * 4 + [7] * 2 + [9]
    got = stacked_lora_add_(out.clone(), x, stacked, rows_mask(ids, stacked))
    rows = [f[i] if i else None for i in ids.tolist()]
    torch.testing.assert_close(got, lora_rows_reference(out, x, rows))
    assert torch.equal(got[[2, 4, 7]], out[[2, 4, 7]])  # rows without an adapter: exactly the base output
    bf = stacked_lora_add_(out.bfloat16(), x.bfloat16(), stacked, rows_mask(ids, stacked))
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf, lora_rows_reference(out.bfloat16(), x.bfloat16(), rows))
