"""The tokenizer generation, chat and the server use: a `tokenizers.Tokenizer` plus what a checkpoint says
about BOS/EOS, stop tokens and the chat template.

    tok = Tokenizer.from_gguf("gemma-3-270m.gguf")      # rebuilt from GGUF metadata (gguf_tokenizer.py)
    tok = Tokenizer.from_hf_dir("out/")                 # tokenizer.json + tokenizer_config.json
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    dec = tok.stream_decoder(); text = "".join(dec.push(i) for i in ids) + dec.flush()

Chat templates put BOS in themselves (Gemma's, Llama 3's), so encode a rendered chat with
`add_special_tokens=False` (or use `encode_chat`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from leanfm.checkpoint.chat_templates import default_chat_template
from leanfm.checkpoint.gguf_tokenizer import template_processor, tokenizer_from_gguf
from leanfm.utils.errors import CheckpointError

# End-of-turn markers that end generation like EOS does, when the vocabulary has them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>")
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Encode/decode/chat-format text for one model. Wraps a `tokenizers.Tokenizer` (`backend`)."""

    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, extra_eos_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        specials = special_tokens or {}
        self.bos_token, self.eos_token = specials.get("bos_token"), specials.get("eos_token")
        self.pad_token, self.unk_token = specials.get("pad_token"), specials.get("unk_token")
        self.chat_template = chat_template
        self.bos_token_id = self._id(self.bos_token)
        self.pad_token_id = self._id(self.pad_token)
        eos = [self._id(self.eos_token), *map(int, extra_eos_ids)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        turn_ends = [self._id(t) for t in END_OF_TURN_TOKENS]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(
            [*self.eos_token_ids, *(i for i in turn_ends if i is not None)]))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        probe = backend.encode("", add_special_tokens=True).ids  # what the post-processor adds
        self.add_bos: bool = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.add_eos: bool = bool(self.eos_token_ids) and probe[-1:] == [self.eos_token_ids[0]] and (
            len(probe) > 1 or not self.add_bos)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})")

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------ loading / saving
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], family: str | None = None) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes; the template defaults by `family` (or architecture)."""
        spec = tokenizer_from_gguf(path)
        template = spec.chat_template or default_chat_template(
            family or spec.architecture, spec.tokenizer.get_vocab(with_added_tokens=True))
        return cls(spec.tokenizer, spec.special_tokens, template, spec.end_ids)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json with tokenizer_config.json, chat_template.jinja and generation_config.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json; save the tokenizer there with transformers' "
                                  f"save_pretrained or leanfm's Tokenizer.save_hf_dir")
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise CheckpointError(f"cannot parse {path / 'tokenizer.json'} ({exc}); re-save it with a "
                                  f"current transformers") from exc
        config = _read_json(path / "tokenizer_config.json")
        token_map = {**_read_json(path / "special_tokens_map.json"), **config}
        specials = {name: _token_text(token_map.get(name)) for name in SPECIAL_NAMES}
        if "add_bos_token" in config or "add_eos_token" in config:  # as transformers does: config wins
            ids = {n: backend.token_to_id(t) if t else None for n, t in specials.items()}
            backend.post_processor = template_processor(
                specials["bos_token"], ids["bos_token"], specials["eos_token"], ids["eos_token"],
                bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, specials, _chat_template(path, config), extra_eos)

    def save_hf_dir(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers-loadable)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"), pretty=False)
        specials = {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS (and EOS) are added as the checkpoint says when `add_special_tokens`."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A decoder for generated ids that returns text as soon as it is final (for streaming)."""
        return IncrementalDetokenizer(self.backend, skip_special_tokens, self._byte_ids, self._special_ids)

    @functools.cached_property
    def _byte_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (<0x00>..<0xFF>) when the decoder has a ByteFallback step."""
        decoder = self.backend.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        return frozenset(i for t, i in self.backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's Jinja chat template."""
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat template; set Tokenizer.chat_template (or add "
                                  "chat_template to tokenizer_config.json), or prompt without chat formatting")
        import jinja2

        template = _compile(self.chat_template)
        variables = {n: getattr(self, n) for n in SPECIAL_NAMES}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **{**variables, **kwargs})
        except jinja2.TemplateError as exc:
            raise CheckpointError(f"the chat template rejected the messages: {exc}; fix the messages "
                                  f"(roles, order, content) to match what the model expects") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """`apply_chat_template` then `encode` without adding BOS again (templates write it themselves)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of ids into text pieces: `push(id)` returns the text that became final.

    Decodes only a window of recent ids (vLLM's prefix/read offsets): the window starts where the last emitted
    text started, so decoder context (a stripped leading space, a partial UTF-8 byte run) is the same in both
    decodes we compare. Text ending in U+FFFD is an incomplete character and is held back until it completes.
    A run of byte-fallback tokens (<0xE4><0xBD><0xA0>) is held until a non-byte token ends it, because
    ByteFallback decodes a run as a whole: one bad byte turns the entire run into U+FFFD.
    `"".join(push(i) for i in ids) + flush() == decode(ids)`.
    """

    def __init__(self, backend: HFTokenizer, skip_special_tokens: bool = True,
                 byte_ids: frozenset[int] = frozenset(), special_ids: frozenset[int] = frozenset()) -> None:
        self._backend, self._skip = backend, skip_special_tokens
        self._byte_ids = byte_ids
        self._invisible = special_ids if skip_special_tokens else frozenset()  # dropped before decoding
        self._in_byte_run = False
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window start / end of the ids already emitted
        self._prefix_text = ""  # decode(ids[prefix:read])

    def _decode(self, start: int, end: int) -> str:
        return self._backend.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id not in self._invisible:
            self._in_byte_run = token_id in self._byte_ids
        if self._in_byte_run:
            return ""
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text):]
        del self._ids[:self._read]  # ids before the new window start are never decoded again
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(0, self._read)
        return new

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end decodes as U+FFFD, as in decode())."""
        self._in_byte_run = False
        text = self._decode(self._prefix, len(self._ids))
        return self._advance(text) if len(text) > len(self._prefix_text) else ""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path} ({exc}); fix or delete the file") from exc


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (named list -> 'default')."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    """A Jinja template compiled the way transformers does (sandboxed, trim/lstrip blocks, tojson, helpers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the checkpoint's chat template does not parse ({exc}); replace "
                              f"Tokenizer.chat_template with a valid Jinja template") from exc
