"""prepare_for_inference on compressed models: forms untouched, plain linears fast, same outputs."""

import torch
from conftest import make_tiny_model

from leanfm.compress import Step, compress_, config_from_dict
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models.layers import FastLinear
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear


def test_prepare_keeps_forms_and_outputs():
    model = make_tiny_model("gemma3", seed=0)
    step = Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}),
                include=("model.layers.0.*", "lm_head"))
    compress_(model, step, progress=False)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model.compute_logits(model(ids, torch.arange(12)))
    prepare_for_inference(model, fast_kernels=True)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(model.model.layers[1].mlp.up_proj) is FastLinear
    with torch.no_grad():
        out = model.compute_logits(model(ids, torch.arange(12)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
