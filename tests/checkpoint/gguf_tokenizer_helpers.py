"""Shared by the tokenizer tests: tiny tensor-less GGUFs whose vocabularies are trained in memory.

`tokenizers` trains the vocabularies on a small corpus: SentencePiece-style 'llama' for archs llama and
gemma3 (byte-fallback pieces, Gemma's space runs and USER_DEFINED tokens), byte-level 'gpt2' with merges
for qwen2; `gguf.GGUFWriter` writes them with a minimal model config. Also the test texts (MIXED, MULTIBYTE).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from leanfm.checkpoint.chat_templates import CHATML

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
