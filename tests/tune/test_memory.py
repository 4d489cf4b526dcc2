"""The memory planner: its parts move the right way between methods and settings, its activation count
matches what autograd keeps, and its total tracks a measured peak RSS (in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_config, make_tiny_model

from leanfm.tune import IA3Config, LoraConfig, QLoraConfig, add_adapter
from leanfm.tune.memory import plan_memory
from leanfm.tune.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")
MB = 1 << 20


def plan(adapter, **train):
    return plan_memory(make_tiny_config("gemma3"), adapter, TrainConfig(batch_size=4, **train), seq_len=48,
                       runtime_bytes=0)


def test_parts_move_the_right_way():
    lora, qlora = plan(LoraConfig(r=4)), plan(QLoraConfig(r=4, group_size=32))
    assert qlora.weights < lora.weights and qlora.load_transient > 0 == lora.load_transient
    assert plan(LoraConfig(r=4), grad_checkpointing=True).activations < lora.activations
    assert plan(LoraConfig(r=4), optimizer="adamw8bit").optimizer < lora.optimizer / 3
    mezo = plan(LoraConfig(r=4), optimizer="mezo")
    assert mezo.gradients == mezo.optimizer == 0 and mezo.activations < lora.activations
    assert plan(IA3Config()).trainable_params < lora.trainable_params == 6 * 4 * (2 * 128 + 2 * 96 + 3 * 192)


def test_activations_match_what_autograd_saves():
    model = make_tiny_model("gemma3").train()
    add_adapter(model, LoraConfig(r=4))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    ids = torch.randint(3, 120, (4, 48))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, torch.arange(48))
    predicted = plan(LoraConfig(r=4))
    per_layer = predicted.activations - 3 * 4 * 48 * 64 * 4  # minus embedding / final-norm outputs
    measured = sum(seen.values())
    assert 0.8 * measured < per_layer * 6 / 7 < 1.3 * measured  # plan counts one extra layer for backward


PROBE = r"""
import json, sys, torch
from leanfm.models import ModelConfig, build_model
from leanfm.tune import LoraConfig, add_adapter
from leanfm.tune.data import Example
from leanfm.tune.memory import limit_heap_retention, peak_rss_bytes, plan_memory
from leanfm.tune.trainer import TrainConfig, train
torch.set_num_threads(1)
limit_heap_retention()
cfg = ModelConfig(family="gemma3", vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True,
                  hidden_act="gelu_pytorch_tanh", qk_norm=True, query_pre_attn_scalar=128)
tc = TrainConfig(steps=2, batch_size=4, lr=1e-3, grad_checkpointing=sys.argv[1] == "1")
p = plan_memory(cfg, LoraConfig(r=8), tc, seq_len=384)
model = build_model(cfg)
add_adapter(model, LoraConfig(r=8))
ex = [Example(tuple(range(5, 389)), tuple(range(5, 389)))] * 8
train(model, ex, ex[:2], tc, pad_id=0, progress=False)
print(json.dumps({"predicted": p.total, "measured": peak_rss_bytes()}))
"""


@pytest.mark.parametrize("checkpointing", ["0", "1"])
def test_total_tracks_measured_peak(checkpointing):
    out = subprocess.run([sys.executable, "-c", PROBE, checkpointing], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", "LEANFM_KERNELS": "0"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.85 < r["predicted"] / r["measured"] < 1.2, {k: v / MB for k, v in r.items()}
