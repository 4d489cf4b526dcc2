"""leanfm.models.decode_plan over the engine's paged cache: one paged_decode_layer call per block at a
decode-only step computes what the module path (each layer its own kernels) computes.

Steps run through the engine's ModelRunner with hand-made block tables: prefill chunks (module path),
then decode steps for every request at once (batch 1 and 3, unequal lengths, blocks of 4 tokens, the
sliding layers of window 8 crossed), against the same steps with paged_decode_args switched off.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_model

from leanfm.compress import Step, compress_, config_from_dict
from leanfm.engine.attn_meta import PagedAttentionMeta
from leanfm.engine.config import EngineConfig
from leanfm.engine.kv.groups import plan_kv_groups
from leanfm.engine.messages import ScheduledChunk
from leanfm.engine.runner import ModelRunner
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models import decode_plan
from leanfm.ops import kernels
from leanfm.ops.kernels import quant

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not kernels.kernels_available(), reason="no C++ kernels")]
BS = 4


class Counter:
    """Counts the blocks that ran paged_decode_layer (wraps decode_plan._paged_block_step)."""

    def __init__(self, monkeypatch):
        self.fused = 0
        inner = decode_plan._paged_block_step

        def step(*args):
            y = inner(*args)
            self.fused += y is not None
            return y

        monkeypatch.setattr(decode_plan, "_paged_block_step", step)


def runner_for(model, **engine) -> ModelRunner:
    cfg = EngineConfig(block_size=BS, num_blocks=64, max_num_seqs=4, **engine)
    kv_bytes = 1 if cfg.kv_cache_dtype == "int8" else 4
    groups = plan_kv_groups(model.config, cfg, kv_bytes, max_model_len=64)
    kv_dtype = torch.int8 if cfg.kv_cache_dtype == "int8" else None
    return ModelRunner(model, groups, BS, kv_dtype)


@torch.inference_mode()
def trace(runner: ModelRunner, prompts: list[list[int]], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Logits of each prefill, then of `steps` decode steps of all requests together (tokens drawn at random)."""
    n_groups = len(runner.groups)
    g = torch.Generator().manual_seed(seed)

    def table(i: int, n_pos: int) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(1 + 16 * i + j for j in range(math.ceil(n_pos / BS))) for _ in range(n_groups))

    outs, lens = [], [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        c = ScheduledChunk(f"r{i}", tuple(p), 0, table(i, len(p)), True)
        outs.append(runner.run_model([c], [len(p) - 1]))
    for _ in range(steps):
        tokens = torch.randint(3, 120, (len(prompts),), generator=g).tolist()
        chunks = [ScheduledChunk(f"r{i}", (t,), lens[i], table(i, lens[i] + 1), True) for i, t in enumerate(tokens)]
        outs.append(runner.run_model(chunks, list(range(len(chunks)))))
        lens = [n + 1 for n in lens]
    return outs


def fused_against_module_path(model, monkeypatch, prompts, steps=14, **engine) -> int:
    """Runs the trace with the one-call blocks and without; returns how many blocks ran the kernel."""
    counter = Counter(monkeypatch)
    got = trace(runner_for(model, **engine), prompts, steps)
    fused = counter.fused
    with monkeypatch.context() as m:
        m.setattr(PagedAttentionMeta, "paged_decode_args", lambda self, layer: None)
        ref = trace(runner_for(model, **engine), prompts, steps)
    assert counter.fused == fused  # nothing fused with the switch off
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    return fused


PROMPTS = {1: [[1, 5, 9, 14, 3]], 3: [[1, 5, 9, 14, 3], [1, 40, 41], [1, *range(10, 21)]]}


@pytest.mark.parametrize("variant", ["llama", "gemma2", "gemma3", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_paged_decode_layer_matches_module_path(variant, batch, monkeypatch):
    model = prepare_for_inference(make_tiny_model(variant, seed=4), fast_kernels=True)
    steps = 14  # positions up to 25: several blocks of 4, past the window of 8
    fused = fused_against_module_path(model, monkeypatch, PROMPTS[batch], steps)
    assert fused == steps * model.config.num_hidden_layers


@pytest.mark.parametrize("act", quant.ACT_MODES)
def test_paged_decode_layer_with_quantized_layers(act, monkeypatch):
    model = make_tiny_model("gemma3", seed=7)
    compress_(model, Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}),
                          include=("model.layers.0.*", "model.layers.2.mlp.*", "model.layers.5.*")), progress=False)
    compress_(model, Step(config_from_dict({"method": "rtn", "bits": 8, "group_size": -1}),
                          include=("model.layers.1.*", "model.layers.3.*")), progress=False)
    prepare_for_inference(model, fast_kernels=True)
    old = quant.set_activation_mode(act)
    try:
        fused = fused_against_module_path(model, monkeypatch, PROMPTS[3], steps=10)
    finally:
        quant.set_activation_mode(old)
    assert fused == 10 * 6


def test_int8_kv_cache_and_compressed_groups_run_the_module_path(monkeypatch):
    model = prepare_for_inference(make_tiny_model("gemma3", seed=4), fast_kernels=True)
    assert fused_against_module_path(model, monkeypatch, PROMPTS[3], steps=6, kv_cache_dtype="int8") == 0
    # StreamingLLM: the full layer's group keeps sinks (module path), the sliding layers stay plain
    fused = fused_against_module_path(model, monkeypatch, PROMPTS[1], steps=14, kv_compression="streaming",
                                      kv_budget=8, kv_sink_tokens=2)
    assert fused == 14 * 5


def test_no_kernel_call_for_multi_token_chunks_hooks_or_unprepared_blocks(monkeypatch):
    model = prepare_for_inference(make_tiny_model("llama", seed=4), fast_kernels=True)
    counter = Counter(monkeypatch)
    runner = runner_for(model)
    with torch.inference_mode():  # a prefill beside a decode: module path
        runner.run_model([ScheduledChunk("a", (1, 2, 3), 0, ((1,),), True)], [2])
        runner.run_model([ScheduledChunk("a", (4,), 3, ((1, 2),), True),
                          ScheduledChunk("b", (1, 2), 0, ((3,),), True)], [0, 2])
    assert counter.fused == 0
    hooked = copy.deepcopy(model)
    hooked.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    assert fused_against_module_path(hooked, monkeypatch, PROMPTS[1], steps=4) == 4 * 1
