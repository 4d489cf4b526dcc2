"""`leanfm serve --lora NAME=DIR`: the request's `model` picks the adapter; concurrent requests for different
adapters (and the base) each equal the offline engine with that adapter; /v1/models lists them; adapters
load and unload at run time (--allow-runtime-lora); bad flags fail before the model loads."""

from __future__ import annotations

import asyncio
import copy

import httpx
import pytest
import torch
from server_testing import ServerProcess, make_server_model, server_model_dir  # noqa: F401 (fixture)
from typer.testing import CliRunner

from leanfm.utils.errors import LeanfmError

BODY = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT = "The quick brown fox"


def make_adapter(path, seed: int, method: str = "lora"):
    from leanfm.tune import DoraConfig, LoraConfig, adapter_parameters, add_adapter, save_adapter

    model = copy.deepcopy(make_server_model())
    add_adapter(model, (DoraConfig if method == "dora" else LoraConfig)(r=4, alpha=8), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"A": make_adapter(root / "a", 1), "B": make_adapter(root / "b", 2), "dora": make_adapter(root / "d", 3, "dora")}


@pytest.fixture(scope="module")
def lora_server(request, server_model_dir, loras):  # noqa: F811
    proc = ServerProcess(server_model_dir, "--served-model-name", "tiny", "--lora", f"A={loras['A']}",
                         "--lora", f"B={loras['B']}", "--allow-runtime-lora")
    request.addfinalizer(proc.stop)
    return proc


@pytest.fixture(scope="module")
def offline(server_model_dir, loras):  # noqa: F811
    """The offline engine with both adapters: what greedy answers must equal."""
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    loaded = load_model(str(server_model_dir), progress=False)
    llm = LLM(loaded.model, loaded.tokenizer, adapters={"A": loras["A"], "B": loras["B"]})
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    return {name: llm.generate(PROMPT, params, adapter=name)[0].text for name in ("A", "B", None)}


def test_model_field_picks_the_adapter_in_one_batch(lora_server, offline):
    async def ask(client, model):
        r = await client.post("/v1/completions", json=dict(model=model, prompt=PROMPT, **BODY))
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=lora_server.url, timeout=120) as client:
            return await asyncio.gather(*(ask(client, m) for m in ("A", "B", "tiny", "A")))

    outs = asyncio.run(all_at_once())
    assert [o["model"] for o in outs] == ["A", "B", "tiny", "A"]
    texts = [o["choices"][0]["text"] for o in outs]
    assert texts == [offline["A"], offline["B"], offline[None], offline["A"]]
    assert len(set(texts)) == 3  # the adapters change the answer


def test_models_lists_base_and_adapters_and_unknown_is_404(lora_server, loras):
    data = httpx.get(lora_server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "A", "B"]
    assert data[1]["parent"] == "tiny" and data[1]["root"] == str(loras["A"])
    r = httpx.post(lora_server.url + "/v1/chat/completions",
                   json=dict(model="C", messages=[{"role": "user", "content": "hi"}], **BODY))
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "'A'" in err["message"]


def test_load_and_unload_at_run_time(lora_server, loras, offline):
    url = lora_server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "C", "lora_path": str(loras["B"])}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    out = httpx.post(url + "/v1/completions", json=dict(model="C", prompt=PROMPT, **BODY), timeout=120).json()
    assert out["choices"][0]["text"] == offline["B"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "D", "lora_path": str(loras["dora"])})
    assert r.status_code == 400 and "not a plain LoRA delta" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "A", "lora_path": str(loras["B"])})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "C"}, timeout=60).status_code == 200
    assert httpx.post(url + "/v1/completions", json=dict(model="C", prompt=PROMPT, **BODY)).status_code == 404
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "C"}).status_code == 404


@pytest.mark.parametrize("args,text", [(["--lora", "noequals"], "--lora takes NAME=DIR"),
                                       (["--lora", "A=/nonexistent"], "not an adapter directory"),
                                       (["--lora", "bad name=/x"], "adapter name")])
def test_bad_lora_flags_fail_before_loading(args, text):
    from leanfm.cli import app

    res = CliRunner().invoke(app, ["serve", "--model", "/nonexistent/model", *args])
    assert isinstance(res.exception, LeanfmError) and text in str(res.exception), res.output


def test_a_dora_adapter_is_refused_before_loading(loras):
    from leanfm.cli import app

    res = CliRunner().invoke(app, ["serve", "--model", "/nonexistent/model", "--lora", f"d={loras['dora']}"])
    assert isinstance(res.exception, LeanfmError) and "--adapter" in str(res.exception), res.output
