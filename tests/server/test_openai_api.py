"""`leanfm serve` driven by the official openai client: completions and chat, streamed and not, n, seeds,
stop strings, echo, logprobs, usage; the model list, tokenize/detokenize and the metrics page."""

import httpx
import openai
import pytest
from server_testing import server, server_model_dir, wait_idle  # noqa: F401 (fixtures)

GREEDY = dict(model="tiny", temperature=0.0, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(server_model_dir):  # noqa: F811
    """The same model through the offline engine: what greedy answers must equal."""
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.llm import LLM

    loaded = load_model(str(server_model_dir), progress=False)
    return LLM(loaded.model, loaded.tokenizer)


def test_completion_equals_the_offline_engine(client, offline):
    from leanfm.engine.params import SamplingParams

    out = client.completions.create(prompt="The quick brown fox", **GREEDY)
    ref = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), 12)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_streamed_completion_concatenates_to_the_whole_one(client):
    whole = client.completions.create(prompt="Streaming works", **GREEDY).choices[0].text
    chunks = list(client.completions.create(prompt="Streaming works", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_whole_and_streamed_agree(client, server):  # noqa: F811
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(messages=messages, **GREEDY)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    count = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["count"]
    assert whole.usage.prompt_tokens == count and whole.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model="tiny", prompt="Sample me", n=3, seed=11, temperature=1.0, max_tokens=10, extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert first.usage.completion_tokens == 30
    streamed = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, stream=True,
                                                   seed=3, max_tokens=6, extra_body={"ignore_eos": True}))
    finals = {c.choices[0].index: c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason}
    assert finals == {0: "length", 1: "length"}


def test_several_prompts_and_token_id_prompts(client):
    out = client.completions.create(prompt=["one", "two two"], n=2, **GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both samples of a prompt agree
    ids = client.completions.create(prompt=[1, 72, 105], **GREEDY)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].finish_reason == "length"


def test_stop_strings_echo_and_penalties(client):
    base = client.completions.create(prompt="Stop here", **GREEDY).choices[0].text
    stop = base[3:5]
    out = client.completions.create(prompt="Stop here", stop=[stop], **GREEDY).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text and base.startswith(out.text)
    echoed = client.completions.create(prompt="Stop here", echo=True, **GREEDY).choices[0].text
    assert echoed == "Stop here" + base
    penalized = client.completions.create(prompt="Stop here", presence_penalty=2.0, frequency_penalty=2.0,
                                          **GREEDY).choices[0].text
    assert penalized != base


def test_logprobs(client):
    out = client.completions.create(prompt="Log me", logprobs=3, **GREEDY).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "x"}], logprobs=True,
                                          top_logprobs=2, **GREEDY).choices[0]
    content = chat.logprobs.content
    assert len(content) == 12 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "x"}], logprobs=True,
                                                 stream=True, **GREEDY))
    streamed = [c for ch in chunks if ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_models_health_tokenize_detokenize(client, server):  # noqa: F811
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "héllo"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 4096
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "héllo"


def test_metrics_page(client, server):  # noqa: F811
    client.completions.create(prompt="count me", **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    m = wait_idle(server.url)
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "prefix_cache_hit_rate", "spec_decode_acceptance_rate", 'kv_blocks_used{group="full"}',
                 'kv_blocks_free{group="sliding"}'):
        assert f"leanfm_{name}" in m, name
    assert "# TYPE leanfm_time_to_first_token_seconds histogram" in text
    assert m["leanfm_generation_tokens_total"] >= 12 and m["leanfm_time_to_first_token_seconds_count"] >= 1
    assert m['leanfm_request_success_total{finished_reason="length"}'] >= 1
