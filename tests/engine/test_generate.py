"""The plain generator on a tiny random model: KV-cache decoding equals a cache-free greedy loop."""

import pytest
import torch

from leanfm.engine.generate import Generator
from leanfm.engine.params import SamplingParams
from leanfm.models import ModelConfig, build_model
from leanfm.utils.errors import ContextLengthError


class ByteTokenizer:
    """ids 0..255 are bytes; 256 is EOS. Enough of the Tokenizer interface for the generator."""

    stop_token_ids = (256,)

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens=True):
        tok = self

        class Stream:
            def __init__(self):
                self.ids, self.sent = [], ""

            def push(self, i):
                self.ids.append(i)
                text = tok.decode(self.ids)
                if text.endswith("\ufffd"):
                    return ""
                new, self.sent = text[len(self.sent):], text
                return new

            def flush(self):
                text = tok.decode(self.ids)
                new, self.sent = text[len(self.sent):], text
                return new

        return Stream()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gen(request):
    torch.manual_seed(0)
    extra = {}
    if request.param == "gemma3":
        extra = dict(qk_norm=True, sliding_window=4, rope_local_base_freq=1e4, tie_word_embeddings=True,
                     hidden_act="gelu_pytorch_tanh",
                     layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    cfg = ModelConfig(family=request.param, vocab_size=257, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, **extra)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return Generator(model, ByteTokenizer())


def greedy_reference(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            logits = model.compute_logits(model(x, torch.arange(len(ids))))[0, -1]
            t = int(logits.argmax())
            if t == 256:
                break
            out.append(t)
            ids.append(t)
    return out


def test_greedy_equals_cache_free_loop(gen):
    prompt = "abcdefg"  # longer than the sliding window
    r = gen.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0))
    assert r.token_ids == greedy_reference(gen.model, list(prompt.encode()), 20)
    assert r.prompt_tokens == 7
    assert r.finish_reason in ("length", "stop")


def test_max_tokens_and_length_finish(gen):
    r = gen.generate("xy", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(r.token_ids) == 5 and r.finish_reason == "length"


def test_stop_token_ends_generation(gen):
    first = gen.generate("hello", SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)).token_ids[0]
    r = gen.generate("hello", SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(first,)))
    assert r.token_ids == [] and r.finish_reason == "stop"


def test_stop_string_cuts_text(gen):
    full = gen.generate("hello", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    text = full.text
    assert len(text) >= 4
    stop = text[2:4]
    r = gen.generate("hello", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,)))
    assert r.text == text[: text.find(stop)] and r.finish_reason == "stop"


def test_stream_concatenates_to_result(gen):
    events = list(gen.stream("abc", SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)))
    assert "".join(e.text for e in events) == events[-1].result.text


def test_seed_reproducible_and_varies(gen):
    p = dict(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, min_p=0.01, ignore_eos=True)
    a = gen.generate("seed", SamplingParams(seed=1, **p)).token_ids
    b = gen.generate("seed", SamplingParams(seed=1, **p)).token_ids
    c = gen.generate("seed", SamplingParams(seed=2, **p)).token_ids
    assert a == b and a != c


def test_repetition_penalty_changes_greedy_output(gen):
    base = gen.generate("aaaa", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)).token_ids
    pen = gen.generate("aaaa", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                              repetition_penalty=5.0)).token_ids
    assert len(set(pen)) >= len(set(base))
    assert pen != base or len(set(base)) == len(base)


def test_prompt_longer_than_context_is_a_clear_error(gen):
    with pytest.raises(ContextLengthError, match="64"):
        gen.generate("x" * 64, SamplingParams(max_tokens=4))


def test_budget_clamped_to_context(gen):
    r = gen.generate("x" * 60, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert len(r.token_ids) == 4 and r.finish_reason == "length"


def test_bad_sampling_params_rejected():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(min_p=1.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
