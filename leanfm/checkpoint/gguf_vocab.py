"""The `tokenizer.ggml.*` metadata of a GGUF, from a leanfm Tokenizer (the inverse of gguf_tokenizer).

    fields = gguf_tokenizer_fields(tok, arch="gemma3", vocab_size=262144)
    fields = tokenizer_fields_from_gguf("model.gguf")      # a source GGUF's own fields, verbatim

Two vocabulary kinds, as llama.cpp names them:
- `llama` (SentencePiece): a BPE model with byte fallback (Gemma, Llama 2). Tokens in id order; the
  scores of the normal tokens fall with their position (-rank among normal tokens, as a SentencePiece BPE
  model stores them up to a constant; only their order matters to llama.cpp, and leanfm's reader merges
  by the same order); `<0xNN>` tokens are BYTE. For Gemma, runs of "▁" (2 or more) are written back as
  the runs of spaces its files hold (user-defined tokens), as gguf_tokenizer reads them.
- `gpt2` (byte-level BPE): tokens in their byte-level spelling plus the merges; `tokenizer.ggml.pre`
  names the split regex when it is one gguf_tokenizer knows or GPT-2's, else "default".
Special added tokens are CONTROL, other added tokens USER_DEFINED. A vocabulary smaller than the
embedding is padded with `[PAD<i>]` (UNUSED), as convert_hf_to_gguf does.
"""

from __future__ import annotations

import json
import os
from typing import Any

from leanfm.checkpoint.gguf_tokenizer import PRE_TOKENIZER_SPLITS, SPIECE, read_gguf_metadata
from leanfm.utils.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_SPECIAL_SCORE = -1000.0


def tokenizer_fields_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Every `tokenizer.*` key of a GGUF file, as written there."""
    return read_gguf_metadata(path, prefixes=("tokenizer.",))


def _pre_name(pre_tokenizer: dict | None) -> str:
    """The `tokenizer.ggml.pre` value whose regex the pre-tokenizer splits with: a known Split regex, GPT-2's
    own (a ByteLevel step that splits), else "default"."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        for name, known in PRE_TOKENIZER_SPLITS.items():
            if regex == known:
                return name
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"
    return "default"


def _adds_space_prefix(spec: dict) -> bool:
    for part in (spec.get("pre_tokenizer"), spec.get("normalizer")):
        for step in (part or {}).get("pretokenizers") or (part or {}).get("normalizers") or [part or {}]:
            if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
                return True
            if step.get("type") == "Prepend" and step.get("prepend") == SPIECE:
                return True
    return False


def _vocab_in_order(spec: dict, vocab_size: int) -> tuple[list[str], dict[int, bool]]:
    """(tokens by id, {added id: special}) padded to vocab_size."""
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {}
    for a in spec.get("added_tokens") or ():
        by_id[a["id"]] = a["content"]
        added[a["id"]] = bool(a.get("special"))
    n = max(vocab_size, max(by_id) + 1)
    if n > vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {n - 1} but the model's vocabulary is {vocab_size}; "
                              "the tokenizer does not match the model")
    return [by_id.get(i, f"[PAD{i}]") for i in range(n)], added


def gguf_tokenizer_fields(tokenizer: Any, arch: str, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` (and `tokenizer.chat_template`) for a leanfm Tokenizer and GGUF arch."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"GGUF export supports BPE tokenizers (SentencePiece-style or byte-level), "
                              f"not {model.get('type')!r}")
    tokens, added = _vocab_in_order(spec, vocab_size)
    padded = {i for i, t in enumerate(tokens) if t == f"[PAD{i}]" and t not in model["vocab"]}
    spm = bool(model.get("byte_fallback"))
    types, scores, rank = [], [], 0
    for i, t in enumerate(tokens):
        if i in padded:
            kind = UNUSED
        elif i in added:
            kind = CONTROL if added[i] else USER_DEFINED
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            kind = BYTE
        else:
            kind = NORMAL
        if spm and arch in _GEMMA_ARCHS and len(t) >= 2 and set(t) == {SPIECE}:
            tokens[i], kind = " " * len(t), USER_DEFINED  # Gemma files hold runs of spaces as such
        types.append(kind)
        scores.append(-float(rank) if kind == NORMAL else 0.0 if kind == BYTE else _SPECIAL_SCORE)
        rank += kind == NORMAL
    fields: dict[str, Any] = {"tokenizer.ggml.model": "llama" if spm else "gpt2",
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if spm:
        fields.update({"tokenizer.ggml.scores": scores, "tokenizer.ggml.pre": "default",
                       "tokenizer.ggml.add_space_prefix": _adds_space_prefix(spec)})
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
        fields.update({"tokenizer.ggml.merges": merges, "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer"))})
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token),
                       ("unknown", tokenizer.unk_token), ("padding", tokenizer.pad_token)):
        tid = None if token is None else tokenizer.token_to_id(token)
        if tid is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = tid
    fields["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    fields["tokenizer.ggml.add_eos_token"] = bool(tokenizer.add_eos)
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields
