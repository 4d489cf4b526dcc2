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
