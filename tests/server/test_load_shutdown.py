"""A bounded load on loopback (mixed lengths, streamed and not, completions and chat, clients leaving
mid-stream) ends with no error and every KV block back; SIGTERM drains: in-flight requests finish (or,
past --shutdown-timeout, end with finish_reason "abort") and the process exits 0."""

import asyncio
import json
import random
import signal

import httpx
from server_testing import ServerProcess, server, server_model_dir, wait_idle  # noqa: F401 (fixtures)

from leanfm.bench.serve_load import RequestSpec, run_load


def load_specs(n: int, seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x"]) for _ in range(rng.randint(1, 60)))
        body = {"max_tokens": rng.randint(2, 24), "temperature": rng.choice([0.0, 0.8]), "seed": i,
                "ignore_eos": rng.random() < 0.5, "stream": i % 3 != 0, "n": 2 if i % 10 == 0 else 1}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        leave = None
        if i % 5 == 2:  # hang up mid-stream on a long request
            body.update(max_tokens=2000, ignore_eos=True, stream=True, n=1)
            leave = 2
        if i % 4 == 1:
            specs.append(RequestSpec("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]},
                                     leave))
        else:
            specs.append(RequestSpec("/v1/completions", {**body, "prompt": text}, leave))
    return specs


def test_bounded_load_with_disconnects_leaks_nothing(server):  # noqa: F811
    specs = load_specs(60)
    result = asyncio.run(run_load(server.url, specs, concurrency=16))
    s = result.summary()
    print(f"\nload: {s['requests']} requests, 16 at a time: TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms, "
          f"p95 {s['ttft_p95_s'] * 1e3:.0f} ms; {s['output_tokens']} output tokens at {s['output_tok_s']:.0f} tok/s")
    assert not result.errors, result.errors[:5]
    assert result.disconnected == sum(sp.disconnect_after is not None for sp in specs) == 12
    m = wait_idle(server.url)  # nothing running or queued, every KV block free, every slot released
    assert m["leanfm_client_disconnects_total"] >= 12


def test_a_client_leaving_a_whole_answer_aborts_it(server):  # noqa: F811
    before = wait_idle(server.url)["leanfm_client_disconnects_total"]
    body = {"prompt": "a long answer nobody waits for", "max_tokens": 3000, "ignore_eos": True}
    try:  # a few thousand engine steps: far longer than the client waits
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
        raise AssertionError("the request finished before the client left")
    except httpx.ReadTimeout:
        pass
    assert wait_idle(server.url)["leanfm_client_disconnects_total"] == before + 1


def first_event(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("no event")


def finish(lines) -> tuple[str | None, str]:
    """(the last finish_reason, the text streamed) once the stream ends with [DONE]."""
    reason, text, done = None, "", False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
    assert done, "the stream ended without [DONE]"
    return reason, text


def test_sigterm_lets_in_flight_requests_finish(server_model_dir):  # noqa: F811
    proc = ServerProcess(server_model_dir, "--shutdown-timeout", "120")
    body = {"prompt": "finish me", "max_tokens": 40, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=proc.url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first_event(lines)
        proc.proc.send_signal(signal.SIGTERM)
        reason, _ = finish(lines)
    assert reason == "length"
    assert proc.stop() == 0, proc.output()
    try:
        httpx.get(proc.url + "/health", timeout=2)
        raise AssertionError("still listening after the shutdown")
    except httpx.TransportError:
        pass


def test_sigterm_past_the_timeout_aborts_and_exits_0(server_model_dir):  # noqa: F811
    proc = ServerProcess(server_model_dir, "--shutdown-timeout", "0")
    body = {"prompt": "never finishes", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    whole = {"prompt": "nor this one", "max_tokens": 4000, "ignore_eos": True}

    async def whole_request():
        async with httpx.AsyncClient(base_url=proc.url, timeout=120) as c:
            return await c.post("/v1/completions", json=whole)

    async def main():
        task = asyncio.ensure_future(whole_request())
        async with httpx.AsyncClient(base_url=proc.url, timeout=120) as c, \
                c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break
            proc.proc.send_signal(signal.SIGTERM)
            streamed = [line async for line in lines]
        return streamed, await task

    streamed, answered = asyncio.run(main())
    reason, _ = finish(streamed)
    assert reason == "abort"
    assert answered.status_code == 200 and answered.json()["choices"][0]["finish_reason"] == "abort"
    assert proc.stop() == 0, proc.output()
