"""DecoderForCausalLM.remove_layers: the result is the model built directly with the remaining layers,
and it decodes through the KV cache like its full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from leanfm.models import ContiguousKVCache, KVCacheMeta, build_model

pytestmark = pytest.mark.usefixtures("single_thread")
B, T = 2, 24


@torch.no_grad()
def logits(model, ids, start=0, meta=None):
    return model.compute_logits(model(ids, torch.arange(start, start + ids.shape[1]), meta))


@pytest.mark.parametrize("variant, drop", [("gemma3", [1, 5]), ("gemma3", [0, 2, 3]), ("llama", [0]),
                                           ("qwen2", [1]), ("mistral", [1]), ("gemma2", [0])])
def test_removed_layers_model_equals_a_model_built_with_the_remaining_layers(variant, drop):
    model = make_tiny_model(variant)
    n = model.config.num_hidden_layers
    keep = [i for i in range(n) if i not in drop]
    types = model.config.layer_types
    model.remove_layers(drop)

    cfg = model.config
    assert cfg.num_hidden_layers == len(keep) == len(model.model.layers)
    assert cfg.layer_types == (tuple(types[i] for i in keep) if types else ())
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(keep)))

    direct = build_model(cfg)
    direct.load_state_dict(model.state_dict())
    direct.eval()
    assert direct._layer_rope == model._layer_rope and direct._inv_freq.keys() == model._inv_freq.keys()
    assert [x.self_attn.window for x in direct.model.layers] == [x.self_attn.window for x in model.model.layers]
    ids = torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(1))
    full = logits(model, ids)
    assert torch.equal(full, logits(direct, ids))

    cache = ContiguousKVCache(cfg, batch=B, max_len=T, dtype=torch.float32)
    out, pos = [], 0
    for step in [10] + [1] * 5 + [6] + [1] * (T - 21):
        out.append(logits(model, ids[:, pos:pos + step], pos, KVCacheMeta(cache, pos)))
        pos += step
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-4)


def test_remove_layers_rejects_bad_indices():
    model = make_tiny_model("llama")
    for bad in ([2], [-1], [0, 1]):
        with pytest.raises(ValueError, match="remove layers"):
            model.remove_layers(bad)
    assert len(model.model.layers) == 2
