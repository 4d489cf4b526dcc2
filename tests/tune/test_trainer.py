"""The trainer on a tiny model: it learns, accumulation and checkpointing do not change the step, an
interrupted run resumes exactly, 8-bit Adam and MeZO work."""

from __future__ import annotations

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model

from leanfm.tune import LoraConfig, adapter_state_dict, add_adapter
from leanfm.tune.config import AdapterError
from leanfm.tune.data import encode_row
from leanfm.tune.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")
TOK = make_byte_tokenizer()
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "egg", "fox", "jam", "kit"]


def dataset(n=24, seed=0):
    """Copy-the-word task: learnable by a tiny model in a few steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        w = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
        rows.append(encode_row({"prompt": f"say {w}:", "completion": f" {w} {w}"}, TOK))
    return rows


def fresh(config=None, seed=0):
    model = make_tiny_model("gemma3", seed=seed, **BYTE_VOCAB)
    add_adapter(model, config or LoraConfig(r=4, alpha=8), seed=1)
    return model


def run(model, cfg, out=None, **kw):
    return train(model, dataset(), dataset(8, seed=1), cfg, pad_id=0, out_dir=out, progress=False, **kw)


def state(model):
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def test_lora_lowers_held_out_loss():
    res = run(fresh(), TrainConfig(steps=25, batch_size=4, lr=1e-2, warmup_steps=2))
    assert res.eval_loss_after < res.eval_loss_before - 0.3
    # r (in + out) per layer: q, o 64->64; k, v 64->32; gate, up 64->128; down 128->64; 6 layers
    assert res.train_tokens > 0 and res.trainable_parameters == 6 * 4 * (2 * 128 + 2 * 96 + 3 * 192)


def test_accumulation_and_checkpointing_do_not_change_the_step():
    base = TrainConfig(steps=3, batch_size=4, lr=1e-2)
    ref = fresh()
    run(ref, base)
    for cfg in (TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-2),
                TrainConfig(steps=3, batch_size=4, lr=1e-2, grad_checkpointing=True)):
        other = fresh()
        run(other, cfg)
        for k, v in state(ref).items():
            torch.testing.assert_close(state(other)[k], v, atol=2e-5, rtol=1e-4)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, save_every=2, schedule="linear", warmup_steps=1)
    dropout = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout draws from the RNG, which must be restored
    straight = fresh(dropout)
    run(straight, cfg, tmp_path / "a")

    import leanfm.tune.trainer as T

    real, calls = T._train_step, {"n": 0}

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "_train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(fresh(dropout), cfg, tmp_path / "b")
    monkeypatch.setattr(T, "_train_step", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    resumed = fresh(dropout)
    res = run(resumed, cfg, tmp_path / "b")
    assert res.steps == 2
    for k, v in state(straight).items():
        torch.testing.assert_close(state(resumed)[k], v, atol=1e-6, rtol=1e-6)
    with pytest.raises(AdapterError, match="different"):
        run(fresh(dropout), TrainConfig(steps=6, batch_size=4, lr=5e-3, save_every=2), tmp_path / "b")


def test_8bit_adam_follows_adamw():
    a, b = fresh(), fresh()
    ra = run(a, TrainConfig(steps=15, batch_size=4, lr=1e-2, optimizer="adamw"))
    rb = run(b, TrainConfig(steps=15, batch_size=4, lr=1e-2, optimizer="adamw8bit"))
    assert rb.eval_loss_after < rb.eval_loss_before - 0.3
    assert abs(ra.eval_loss_after - rb.eval_loss_after) < 0.1 * ra.eval_loss_before


def test_mezo_moves_with_two_forward_passes():
    model = fresh()
    before = state(model)
    res = run(model, TrainConfig(steps=4, batch_size=4, lr=1e-3, optimizer="mezo", mezo_eps=1e-3))
    assert any(not torch.equal(before[k], v) for k, v in state(model).items())
    assert all(p.grad is None for p in model.parameters())
    assert res.eval_loss_after == res.eval_loss_after  # finite, not NaN


def test_bf16_autocast_runs():
    res = run(fresh(), TrainConfig(steps=3, batch_size=4, lr=1e-2, bf16=True))
    assert res.eval_loss_after < res.eval_loss_before


def test_too_little_data_is_refused():
    with pytest.raises(AdapterError, match="fewer than one batch"):
        train(fresh(), dataset(3), dataset(2), TrainConfig(batch_size=4), pad_id=0, progress=False)
