"""Bad input over plain HTTP: every case a 4xx in OpenAI's error shape, never a 500; the API key; a full
queue answered 429 with Retry-After; a burst of invalid requests beside valid ones."""

import asyncio
import json

import httpx
import pytest
from server_testing import guarded, server, server_model_dir, wait_idle  # noqa: F401 (fixtures)

OK = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LONG = {"prompt": "x" * 5000}  # the byte tokenizer: one token per byte, the context is 4,096

CASES = {
    # name: (path, raw body or dict, expected status, text expected in the message)
    "bad_json": ("/v1/completions", '{"prompt": "x", ', 400, "not valid JSON"),
    "not_an_object": ("/v1/completions", "[1, 2]", 400, ""),
    "empty_body": ("/v1/completions", "", 400, ""),
    "nan": ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    "missing_prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "max_tokens_string": ("/v1/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    "temperature_string": ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    "negative_max_tokens": ("/v1/completions", {**OK, "max_tokens": -3}, 400, "max_tokens"),
    "zero_max_tokens": ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    "top_p_zero": ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    "penalty_range": ("/v1/completions", {**OK, "presence_penalty": 3}, 400, "presence_penalty"),
    "n_zero": ("/v1/completions", {**OK, "n": 0}, 400, "n"),
    "logprobs_too_many": ("/v1/completions", {**OK, "logprobs": 50}, 400, "logprobs"),
    "empty_prompt_list": ("/v1/completions", {**OK, "prompt": []}, 400, "empty"),
    "token_out_of_vocab": ("/v1/completions", {**OK, "prompt": [1, 99999]}, 400, "vocabulary"),
    "bool_prompt": ("/v1/completions", {**OK, "prompt": [True]}, 400, "prompt"),
    "empty_stop": ("/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    "seed_huge": ("/v1/completions", {**OK, "seed": 2**70}, 400, "seed"),
    "logit_bias": ("/v1/completions", {**OK, "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    "unknown_model": ("/v1/completions", {**OK, "model": "gpt-9"}, 404, "gpt-9"),
    "oversize_prompt": ("/v1/completions", LONG, 400, "5001 tokens"),
    "prompt_plus_max_tokens": ("/v1/completions", {"prompt": "x" * 4000, "max_tokens": 200}, 400, "4201 tokens"),
    "messages_not_list": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "messages_empty": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    "image_part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    "tools": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    "top_logprobs_alone": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "logprobs"),
    "oversize_chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 5000}]}, 400,
                      "maximum context length"),
    "tokenize_nothing": ("/tokenize", {}, 400, "prompt"),
    "detokenize_bad_id": ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    "unknown_route": ("/v1/nope", OK, 404, ""),
}


def post(url: str, body, **kw) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60, **kw)
    return httpx.post(url, json=body, timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert text in err["message"], err
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_4xx_in_openai_shape(server, case):  # noqa: F811
    path, body, status, text = CASES[case]
    assert_openai_error(post(server.url + path, body), status, text)


def test_error_details(server):  # noqa: F811
    err = assert_openai_error(post(server.url + "/v1/completions", LONG), 400)
    assert err["code"] == "context_length_exceeded" and "4096" in err["message"]
    assert assert_openai_error(post(server.url + "/v1/completions", {**OK, "model": "x"}), 404)["code"] == \
        "model_not_found"
    assert assert_openai_error(post(server.url + "/v1/completions", {**OK, "max_tokens": "5"}), 400)["param"] == \
        "max_tokens"
    assert_openai_error(httpx.get(server.url + "/v1/completions"), 405)
    streamed = post(server.url + "/v1/completions", {**LONG, "stream": True})  # refused before the stream starts
    assert_openai_error(streamed, 400, "maximum context length")


def test_invalid_burst_beside_valid_requests(server):  # noqa: F811
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def bad(i):
                path, body, _, _ = CASES[sorted(CASES)[i % len(CASES)]]
                if isinstance(body, str):
                    return await c.post(path, content=body, headers={"content-type": "application/json"})
                return await c.post(path, json=body)

            good = [c.post("/v1/completions", json={**OK, "max_tokens": 8, "prompt": f"valid {i}"}) for i in range(6)]
            return await asyncio.gather(*good, *(bad(i) for i in range(60)))

    responses = asyncio.run(main())
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1 for r in responses[:6])
    assert all(400 <= r.status_code < 500 for r in responses[6:])
    wait_idle(server.url)


KEY = {"Authorization": "Bearer sk-test"}


def test_api_key(guarded):  # noqa: F811
    assert httpx.get(guarded.url + "/health").status_code == 200  # open, for load balancers
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sk-test"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                             ("POST", "/tokenize")):
            r = httpx.request(method, guarded.url + path, json=OK, headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    assert httpx.post(guarded.url + "/v1/completions", content="{bad", headers=KEY).status_code == 400
    r = httpx.post(guarded.url + "/v1/completions", json=OK, headers=KEY, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_full_queue_is_429_with_retry_after(guarded):  # noqa: F811
    long = {"prompt": "keep me busy", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=guarded.url, headers=KEY, timeout=60) as c1, \
            httpx.Client(base_url=guarded.url, headers=KEY, timeout=60) as c2:
        with c1.stream("POST", "/v1/completions", json=long) as s1, c2.stream("POST", "/v1/completions", json=long) as s2:
            assert s1.status_code == s2.status_code == 200
            lines = s1.iter_lines()  # keep the iterator: dropping it would close the stream
            assert next(lines).startswith("data: ")  # the running one streams; the queued one holds its slot
            r = httpx.post(guarded.url + "/v1/completions", json=OK, headers=KEY)
            assert_openai_error(r, 429, "busy")
            assert int(r.headers["Retry-After"]) >= 1
            big_n = httpx.post(guarded.url + "/v1/completions", json={**OK, "n": 3}, headers=KEY)
            assert_openai_error(big_n, 400, "at most 2")
    # both clients left mid-stream: their requests were aborted and every KV block came back
    m = wait_idle(guarded.url, KEY)
    assert m["leanfm_client_disconnects_total"] >= 2
    assert m['leanfm_requests_rejected_total{reason="queue_full"}'] >= 1
    r = httpx.post(guarded.url + "/v1/completions", json=OK, headers=KEY, timeout=60)
    assert r.status_code == 200


def test_no_500_on_strange_json(server):  # noqa: F811
    strange = ['{"prompt": null}', '{"prompt": {"a": 1}}', '{"prompt": "x", "stream_options": 5}',
               '{"prompt": "x", "stop": [1, 2]}', json.dumps({"prompt": "x", "n": 10**30}),
               json.dumps({"prompt": [[1, 2], "x"]}), '"just a string"', "null", '{"prompt": "x", "echo": "yes"}']
    for body in strange:
        r = post(server.url + "/v1/completions", body)
        assert 400 <= r.status_code < 500, (body, r.text)
