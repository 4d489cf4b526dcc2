"""Tokenizer wrapper: the streaming (incremental) detokenizer, chat templates and HF tokenizer directories.

On the tiny synthetic GGUF tokenizers of gguf_tokenizer_helpers.py (llama and gemma3 SentencePiece-style,
gpt2 byte-level BPE): streamed text equals decode() without leaking partial characters, the default and
GGUF chat templates render (sandboxed), and save_hf_dir / from_hf_dir round-trip and load in transformers.
Building the tokenizers from GGUF and the real-model checks are in test_tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_tokenizer_helpers import MIXED, MULTIBYTE, WRITERS

from leanfm.checkpoint.chat_templates import CHATML, GEMMA, LLAMA3, default_chat_template
from leanfm.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer
from leanfm.utils.errors import CheckpointError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_tok")
    return {name: writer(root / f"{name}.gguf") for name, writer in WRITERS.items()}


@pytest.fixture(scope="module")
def toks(synthetic) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(p) for name, p in synthetic.items()}


# ------------------------------------------------------------------ unit: streaming
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_equals_decode(toks, skip):
    text = MULTIBYTE + " <end_of_turn> " + MIXED + "<|im_end|>🎉"
    for name, tok in toks.items():
        ids = tok.encode(text)
        dec = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids]
        tail = dec.flush()
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), name
        assert not any("\ufffd" in p for p in pieces), name


def test_incremental_holds_back_partial_characters(toks):
    tok = toks["gemma3"]
    b = [tok.token_to_id(f"<0x{x:02X}>") for x in "你".encode()]
    dec = tok.stream_decoder()
    x = tok.encode("x", add_special_tokens=False)[0]
    assert [dec.push(i) for i in [*b, x]] == ["", "", "", "你x"]  # a byte run is final when it ends
    assert dec.push(b[0]) == "" and dec.flush() == "\ufffd" == tok.decode([b[0]])
    # ByteFallback decodes a run whole: one stray byte turns all of it into U+FFFD, so nothing leaks early
    ff, eot = tok.token_to_id("<0xFF>"), tok.token_to_id("<end_of_turn>")
    ids = [x, *b, eot, ff, x]
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids) == "x" + "\ufffd" * 4 + "x"


def test_incremental_window_stays_small(toks):
    tok = toks["gpt2"]
    ids = tok.encode(MIXED * 20)
    dec = IncrementalDetokenizer(tok.backend)
    longest = 0
    for i in ids:
        dec.push(i)
        longest = max(longest, len(dec._ids))
    assert longest <= 8 and dec.flush() == ""


# ------------------------------------------------------------------ unit: chat templates
def test_default_chat_templates():
    assert default_chat_template("gemma3") == GEMMA and default_chat_template("qwen2") == CHATML
    assert default_chat_template("llama3") == LLAMA3
    assert default_chat_template("llama") is None
    assert default_chat_template("llama", {"<|im_start|>": 1}) == CHATML
    assert default_chat_template("mistral", {"<|start_header_id|>": 5}) == LLAMA3


def test_gemma_default_template_renders(toks):
    tok = toks["gemma3"]
    assert tok.chat_template == GEMMA  # the file has none; arch gemma3 picks Gemma's
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat(msgs[1:2])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    with pytest.raises(CheckpointError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chatml_and_helpers(toks):
    tok = toks["gpt2"]
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert out == "<|im_start|>user\nhi<|im_end|>\n"
    tok2 = Tokenizer(tok.backend, {"bos_token": "<|im_start|>"},
                     chat_template="{{ bos_token }}{{ messages | tojson }}{{ strftime_now('%Y') | length }}"
                                   "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}."
                                   "{% endfor %}{{ extra }}")
    assert tok2.apply_chat_template([{"role": "user", "content": "é"}] * 2, extra="!") == (
        '<|im_start|>[{"role": "user", "content": "é"}, {"role": "user", "content": "é"}]4.!')
    with pytest.raises(CheckpointError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(CheckpointError, match="does not parse"):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template([])


def test_template_is_sandboxed(toks):
    evil = Tokenizer(toks["gpt2"].backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception):  # noqa: B017 - jinja's SecurityError
        evil.apply_chat_template([])


# ------------------------------------------------------------------ unit: HF directories
def test_save_and_load_hf_dir_round_trip(toks, tmp_path):
    for name, tok in toks.items():
        out = tmp_path / name
        tok.save_hf_dir(out)
        assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
        back = Tokenizer.from_hf_dir(out)
        assert back.encode(MIXED) == tok.encode(MIXED), name
        # (extra EOS ids such as GGUF's eot id travel in generation_config.json, which the model saver writes)
        assert (back.add_bos, back.bos_token_id, back.eos_token_ids[0], back.stop_token_ids, back.chat_template) == (
            tok.add_bos, tok.bos_token_id, tok.eos_token_ids[0], tok.stop_token_ids, tok.chat_template), name


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_saved_hf_dir_loads_in_transformers(toks, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    toks[name].save_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (MIXED, "<|im_end|> x <end_of_turn>"):
        assert ref.encode(text) == toks[name].encode(text), name
    assert ref.bos_token == toks[name].bos_token and ref.eos_token == toks[name].eos_token


def test_from_hf_dir_extras(toks, tmp_path):
    tok = toks["gpt2"]
    tok.save_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ 'jinja file wins' }}")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token={"content": "<|im_start|>", "special": True})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    back = Tokenizer.from_hf_dir(tmp_path)
    assert back.eos_token_ids == (2, 0) and back.apply_chat_template([]) == "jinja file wins"
    assert back.add_bos and back.encode("hi")[0] == 1


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot parse"):
        Tokenizer.from_hf_dir(tmp_path)
