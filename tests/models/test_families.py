"""The model runtime is exact: every family matches transformers (the oracle) logit for logit.

Each variant is a tiny random-weight transformers model built from a hand-written HF config
(conftest.HF_CONFIGS, not leanfm's converter), saved with save_pretrained, loaded through
leanfm.checkpoint.hf and compared on sequences longer than the sliding window: full forward,
incremental decoding through the KV cache, bf16, and the way back (leanfm saves, transformers loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import HF_CONFIGS, make_hf_model, make_tiny_config

from leanfm.checkpoint.hf import load_model_from_hf_dir, save_hf_dir
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models import ContiguousKVCache, KVCacheMeta, build_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, 24  # T = 3 x the sliding window


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@dataclass
class Case:
    variant: str
    path: Path
    model: torch.nn.Module  # leanfm, loaded from the transformers-saved directory
    ids: torch.Tensor
    ref: torch.Tensor  # transformers' logits (B, T, V)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request, tmp_path_factory) -> Case:
    variant = request.param
    hf = make_hf_model(variant)
    path = tmp_path_factory.mktemp(variant)
    hf.save_pretrained(path)
    ids = torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    return Case(variant, path, load_model_from_hf_dir(path), ids, ref)


@torch.no_grad()
def logits(model, ids: torch.Tensor, start: int = 0, meta=None) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1])
    return model.compute_logits(model(ids, positions, meta))


def test_config_read_from_transformers_equals_tiny_config(case):
    assert case.model.config.replace(name="") == make_tiny_config(case.variant)


def test_logits_match_transformers(case):
    ours = logits(case.model, case.ids)
    assert ours.shape == case.ref.shape
    assert max_diff(ours, case.ref) <= 1e-4, case.variant


def test_incremental_decoding_matches_full_forward(case):
    """Prefill 10 tokens, decode 5 one by one, a chunk of 6, then the rest one by one."""
    full = logits(case.model, case.ids)
    cache = ContiguousKVCache(case.model.config, batch=B, max_len=T, dtype=torch.float32)
    steps, pos = [10] + [1] * 5 + [6] + [1] * (T - 21), 0
    out = []
    for n in steps:
        out.append(logits(case.model, case.ids[:, pos:pos + n], pos, KVCacheMeta(cache, pos)))
        pos += n
    assert pos == T
    assert max_diff(torch.cat(out, dim=1), full) <= 1e-4, case.variant


def test_prepared_model_matches_transformers(case):
    """prepare_for_inference (C++ kernels, fused decode paths): full forward and decoding, same 1e-4."""
    model = prepare_for_inference(load_model_from_hf_dir(case.path))
    assert max_diff(logits(model, case.ids), case.ref) <= 1e-4, case.variant
    cache = ContiguousKVCache(model.config, batch=B, max_len=T, dtype=torch.float32)
    steps, pos, out = [6] + [1] * (T - 6), 0, []
    for n in steps:
        out.append(logits(model, case.ids[:, pos:pos + n], pos, KVCacheMeta(cache, pos)))
        pos += n
    assert max_diff(torch.cat(out, dim=1), case.ref) <= 1e-4, case.variant


def test_bf16_runs_and_is_close_to_fp32(case):
    model = load_model_from_hf_dir(case.path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    full = logits(model, case.ids)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    scale = case.ref.abs().max().item()
    assert max_diff(full, case.ref) <= 0.1 * scale, case.variant
    # a decode step through a bf16 cache agrees with the bf16 full forward
    cache = ContiguousKVCache(model.config, batch=B, max_len=T, dtype=torch.bfloat16)
    logits(model, case.ids[:, :T - 1], 0, KVCacheMeta(cache, 0))
    last = logits(model, case.ids[:, T - 1:], T - 1, KVCacheMeta(cache, T - 1))
    assert max_diff(last[:, 0], full[:, -1]) <= 0.05 * scale, case.variant


def test_saved_dir_loads_in_transformers_with_identical_logits(case, tmp_path):
    out = save_hf_dir(case.model, tmp_path / "out")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        theirs = back.eval()(case.ids).logits
    assert max_diff(theirs, case.ref) == 0.0, case.variant
    assert max_diff(theirs, logits(case.model, case.ids)) <= 1e-4


def test_sliding_window_changes_the_result(case):
    """The window matters on these inputs, so the checks above would catch a wrong window."""
    cfg = case.model.config
    if not cfg.sliding_window:
        pytest.skip("no sliding layers")
    wide = build_model(cfg.replace(sliding_window=4 * T))
    wide.load_state_dict(case.model.state_dict())
    assert max_diff(logits(wide.eval(), case.ids), case.ref) > 1e-2


def test_gemma3_scales_only_global_rope_even_when_bases_are_equal(tmp_path):
    """Regression: RoPE tables were keyed by base alone, so equal local/global bases scaled the local layers."""
    hf = make_hf_model("gemma3_scaled", rope_local_base_freq=1_000_000.0)
    hf.save_pretrained(tmp_path)
    model = load_model_from_hf_dir(tmp_path)
    assert model.config.rope_local_base_freq == model.config.rope_theta == 1_000_000.0
    ids = torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_diff(logits(model, ids), ref) <= 1e-4
