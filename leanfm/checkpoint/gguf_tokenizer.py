"""Rebuild a Hugging Face `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the tokens, their scores and
types, merges (byte-level BPE only), the special ids and a chat template. We rebuild exactly the
tokenizer transformers derives from the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`),
so ids agree token for token:

- `llama` (SentencePiece): a BPE model with byte fallback whose merges are recovered from the vocabulary,
  best score first. Gemma files rank by position instead (their scores do not follow merge order), store
  runs of spaces as real spaces, and split on nothing: spaces become "▁" in a normalizer.
- `gpt2`: byte-level BPE from the file's merges, split by the regex `tokenizer.ggml.pre` names.

Tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens, so both stay whole.
The metadata is read with a small header parser: `gguf.GGUFReader` builds a numpy view per string and takes
~15 s on Gemma's 262k-token vocabulary; this reads the same fields in a fraction of a second.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from leanfm.checkpoint.gguf_file import open_gguf
from leanfm.utils.errors import CheckpointError

SUPPORTED_MODELS = ("llama", "gpt2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPIECE = "\u2581"

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> split regex; any other value keeps GPT-2's own ByteLevel regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


@dataclass
class GGUFTokenizerSpec:
    """The rebuilt tokenizer plus what the file says about using it."""

    tokenizer: HFTokenizer
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    architecture: str  # general.architecture
    special_tokens: dict[str, str | None]  # bos_token/eos_token/unk_token/pad_token -> content
    special_ids: dict[str, int | None]  # same keys -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    end_ids: tuple[int, ...] = ()  # tokenizer.ggml.eot_token_id / eom_token_id: also end generation


# ---------------------------------------------------------------- metadata
def read_gguf_metadata(path: str | os.PathLike[str], prefixes: tuple[str, ...] = ("general.", "tokenizer.")
                       ) -> dict[str, Any]:
    """The metadata key/values of a GGUF (v2/v3) file whose keys start with one of `prefixes` (arrays as lists)."""
    fields = open_gguf(path).fields
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in fields.items() if k.startswith(prefixes)}


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """The same dict from a `gguf.GGUFReader` someone already opened."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", "tokenizer.")):
            meta[key] = field.contents()
    return meta


# ---------------------------------------------------------------- builders
def merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score first.

    Same order as transformers' `generate_merges`: by score, then longer left piece, then `scores` order.
    """
    lefts, rights, ranks = [], [], []
    for piece, score in scores.items():
        for i in range(len(piece) - 1, 0, -1):
            left = piece[:i]
            if left in vocab and piece[i:] in vocab:
                lefts.append(left)
                rights.append(piece[i:])
                ranks.append(score)
    len_left = np.fromiter(map(len, lefts), dtype=np.int64, count=len(lefts))
    len_right = np.fromiter(map(len, rights), dtype=np.int64, count=len(rights))
    order = np.lexsort((-len_right, -len_left, -np.asarray(ranks, dtype=np.float64)))  # stable
    return [(lefts[k], rights[k]) for k in order.tolist()]


def _spm_decoder(strip_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if strip_prefix else []))


def _gemma(tokens: list[str], scores: list[float]) -> HFTokenizer:
    # Runs of spaces are stored as real spaces but looked up as "▁▁..."; rank merges by file position.
    tokens = [SPIECE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = merges_from_vocab(vocab, {t: -i for i, t in enumerate(tokens)})
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                          byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPIECE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = _spm_decoder(strip_prefix=False)
    return tok


def _llama_spm(tokens: list[str], scores: list[float]) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = merges_from_vocab(vocab, dict(zip(tokens, scores, strict=True)))
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="first", split=False)
    tok.decoder = _spm_decoder(strip_prefix=True)
    return tok


def _phi3_spm(tokens: list[str], scores: list[float]) -> HFTokenizer:
    tok = _llama_spm(tokens, scores)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    tok.pre_tokenizer = None
    return tok


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes map to U+0100.. in byte order
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level(tokens: list[str], merges: list[str]) -> HFTokenizer:
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = HFTokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_model(meta: dict[str, Any], model: str, arch: str) -> HFTokenizer:
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if model == "gpt2":
        if "tokenizer.ggml.merges" not in meta:
            raise CheckpointError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges; re-convert the "
                                  "model with a current llama.cpp convert_hf_to_gguf.py")
        return _byte_level(tokens, meta["tokenizer.ggml.merges"])
    if scores is None:
        raise CheckpointError("GGUF SentencePiece (llama) tokenizer has no tokenizer.ggml.scores; re-convert the "
                              "model with a current llama.cpp convert_hf_to_gguf.py")
    builder = _gemma if arch in _GEMMA_ARCHS else _phi3_spm if arch == "phi3" else _llama_spm
    return builder(tokens, scores)


def _add_typed_tokens(tok: HFTokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones (e.g. "\\n\\n", "<think>") plain ones."""
    alphabet = set(byte_level_alphabet().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=True)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def template_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                       add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """The post-processor that prepends BOS / appends EOS (transformers' `update_post_processor`)."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


_SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def tokenizer_from_gguf(path_or_reader: str | os.PathLike[str] | Any) -> GGUFTokenizerSpec:
    """Rebuild the tokenizer a GGUF file describes (a path, or an open `gguf.GGUFReader`)."""
    if isinstance(path_or_reader, (str, os.PathLike)):
        meta = read_gguf_metadata(path_or_reader)
    else:
        meta = _metadata_from_reader(path_or_reader)
    model, arch = meta.get("tokenizer.ggml.model"), meta.get("general.architecture", "")
    if model not in SUPPORTED_MODELS or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_MODELS)}); load the model from an HF directory instead")
    tokens = meta["tokenizer.ggml.tokens"]
    for key in ("scores", "token_type"):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and len(values) != len(tokens):
            raise CheckpointError(f"GGUF tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens; "
                                  f"the file is corrupt, re-convert or re-download it")
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_KEYS.items()}
    specials = {name: tokens[i] if i is not None and 0 <= i < len(tokens) else None for name, i in ids.items()}
    tok = _build_model(meta, model, arch)
    _add_typed_tokens(tok, tokens, meta.get("tokenizer.ggml.token_type") or [0] * len(tokens), model == "gpt2")
    named = [*specials.values(), "<mask>" if arch in _GEMMA_ARCHS else None]  # GemmaTokenizer's mask token
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in named
                            if s is not None and tok.token_to_id(s) is not None])
    pre = meta.get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZER_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos_id = None if specials["bos_token"] is None else tok.token_to_id(specials["bos_token"])
    eos_id = None if specials["eos_token"] is None else tok.token_to_id(specials["eos_token"])
    tok.post_processor = template_processor(specials["bos_token"], bos_id, specials["eos_token"], eos_id,
                                            add_bos, add_eos)
    ends = tuple(meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta)
    return GGUFTokenizerSpec(tok, model, pre, arch, specials, ids, add_bos and bos_id is not None,
                             add_eos and eos_id is not None, meta.get("tokenizer.chat_template"), ends)
