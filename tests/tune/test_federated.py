"""Federated LoRA with Flower's simulation: 3 non-IID clients, 3 rounds of FedAvg lower the held-out loss,
and the bytes communicated per round are reported (adapter tensors only)."""

from __future__ import annotations

import pytest
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model

from leanfm.tune import LoraConfig
from leanfm.tune.data import encode_row
from leanfm.tune.federated import FedConfig, federated_finetune, non_iid_split
from leanfm.tune.trainer import TrainConfig

pytest.importorskip("flwr")
pytest.importorskip("ray")
WORDS = ["cat", "dog", "sun", "map", "pen", "cup"]


def make_model():
    return make_tiny_model("gemma3", **BYTE_VOCAB)


def test_three_clients_three_rounds(capsys):
    tok = make_byte_tokenizer()
    words = WORDS * 6
    examples = [encode_row({"prompt": f"say {w}:", "completion": f" {w} {w}"}, tok) for w in words]
    clients = non_iid_split(examples, words, 3, alpha=0.3, seed=0, min_size=4)
    assert sorted(len(c) for c in clients) != [12, 12, 12]  # skewed
    held = [encode_row({"prompt": f"say {w}:", "completion": f" {w} {w}"}, tok) for w in WORDS]
    config = FedConfig(rounds=3, local=TrainConfig(steps=4, batch_size=4, lr=1e-2, schedule="constant"))
    result = federated_finetune(make_model, LoraConfig(r=4), clients, held, config, pad_id=0)
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    assert result.rounds[-1]["eval_loss"] < result.eval_loss_before
    adapter_bytes = sum(t.numel() * 4 for t in result.parameters.values())
    for r in result.rounds:
        assert r["clients"] == 3 and r["bytes"] == r["bytes_down"] + r["bytes_up"]
        assert 6 * adapter_bytes <= r["bytes"] < 6 * adapter_bytes * 1.2  # 3 down + 3 up, plus npy headers
    out = capsys.readouterr().out
    assert "round 3: held-out loss" in out and "bytes" in out
