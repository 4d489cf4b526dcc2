"""Read GGUF checkpoints (llama.cpp's format) into a ModelConfig and a Hugging-Face-named float state dict.

The header is parsed by `gguf_file` (a fast mmap walk); tensors are dequantized one at a time with
`gguf.quants.dequantize`, and llama.cpp's conversion is undone (q/k rows un-permuted for arch `llama`, Gemma norms stored as w + 1 shifted back).
A tied model's state dict holds `model.embed_tokens.weight` only, as HF checkpoints do: to load it
strictly into a leanfm model add `sd["lm_head.weight"] = sd["model.embed_tokens.weight"]` first.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from leanfm.checkpoint import gguf_names as N
from leanfm.checkpoint.gguf_file import GGUFFile, TensorInfo, gguf_metadata, open_gguf
from leanfm.models.config import ModelConfig, RopeScaling
from leanfm.utils.errors import CheckpointError

__all__ = ["SUPPORTED_TYPES", "gguf_metadata", "load_gguf_state_dict", "open_gguf", "read_gguf_config"]

_Q = GGMLQuantizationType
SUPPORTED_TYPES: frozenset[int] = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})
_CHUNK_ELEMENTS = 1 << 22  # dequantize 4M values (16 MB of float32) at a time


# --- metadata -> ModelConfig ---------------------------------------------------------
class _Meta:
    def __init__(self, g: GGUFFile):
        self.g, self.arch = g, g.arch

    def get(self, key: str, default: Any = None) -> Any:
        v = self.g.fields.get(f"{self.arch}.{key}", default)
        if isinstance(v, np.ndarray):  # per-layer arrays (e.g. head_count_kv): must be uniform
            if len(set(v.tolist())) != 1:
                raise CheckpointError(
                    f"{self.g.path}: per-layer {self.arch}.{key} = {v.tolist()} is not supported by leanfm")
            v = v.tolist()[0]
        return v

    def req(self, key: str) -> Any:
        if (v := self.get(key)) is None:
            raise CheckpointError(f"{self.g.path} lacks required metadata key {self.arch}.{key}; re-convert "
                                  "it with a current llama.cpp convert_hf_to_gguf.py")
        return v


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a GGUF file describes (llama, qwen2, qwen3, gemma2, gemma3 architectures)."""
    return _config_from(open_gguf(path))


def _config_from(g: GGUFFile) -> ModelConfig:
    arch = g.arch
    if arch not in N.ARCH_FAMILY:
        raise CheckpointError(
            f"{g.path}: GGUF architecture {arch or '(missing)'!r} is not supported; supported: "
            f"{', '.join(N.SUPPORTED_ARCHS)}")
    m = _Meta(g)
    hidden, n_heads = int(m.req("embedding_length")), int(m.req("attention.head_count"))
    head_dim = int(m.get("attention.key_length") or m.get("rope.dimension_count") or hidden // n_heads)
    name = str(g.fields.get("general.name", ""))
    mistral = arch == "llama" and "mistral" in name.lower()  # llama.cpp files Mistral under "llama"
    kw: dict[str, Any] = dict(
        family="mistral" if mistral else N.ARCH_FAMILY[arch], hidden_size=hidden, num_attention_heads=n_heads, head_dim=head_dim,
        num_hidden_layers=int(m.req("block_count")),
        intermediate_size=int(m.req("feed_forward_length")),
        num_key_value_heads=int(m.get("attention.head_count_kv") or n_heads),
        max_position_embeddings=int(m.req("context_length")),
        rms_norm_eps=float(m.req("attention.layer_norm_rms_epsilon")),
        rope_theta=float(m.get("rope.freq_base", 10000.0)),
        vocab_size=_vocab_size(g, m),
        hidden_act=N.HIDDEN_ACT[arch],
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
        rope_scaling=_rope_scaling(g, m, head_dim),
        name=name, extra={"gguf_architecture": arch},
        **_token_ids(g, arch),
    )
    if arch in ("gemma2", "gemma3"):
        kw.update(_gemma_fields(m, kw))
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{g.path}: metadata gives an invalid config ({e})") from None


def _vocab_size(g: GGUFFile, m: _Meta) -> int:
    """`<arch>.vocab_size`, else the tokenizer's token count, else the embedding's rows."""
    if m.get("vocab_size"):
        return int(m.get("vocab_size"))
    if "tokenizer.ggml.tokens" in g.fields:
        return len(g.fields["tokenizer.ggml.tokens"])
    return g.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in g.tensors else 0


def _token_ids(g: GGUFFile, arch: str) -> dict[str, Any]:
    f = g.fields
    eos = [int(f[f"tokenizer.ggml.{k}_token_id"]) for k in ("eos", "eot", "eom") if f"tokenizer.ggml.{k}_token_id" in f]
    tokens = f.get("tokenizer.ggml.tokens") or []
    if tokens:
        eog = frozenset(N.EOG_TOKEN_TEXTS)
        index = {t: i for i, t in enumerate(tokens) if t in eog}
        eos += [index[t] for t in N.EOG_TOKEN_TEXTS if t in index]
    bos, pad = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.padding_token_id")
    return dict(bos_token_id=None if bos is None else int(bos), pad_token_id=None if pad is None else int(pad),
                eos_token_id=tuple(dict.fromkeys(eos)))


def _gemma_fields(m: _Meta, kw: dict[str, Any]) -> dict[str, Any]:
    n, arch = kw["num_hidden_layers"], m.arch
    swa = m.g.fields.get(f"{arch}.attention.sliding_window_pattern")  # absent from llama.cpp's gemma files
    if isinstance(swa, np.ndarray) and len(swa) == n:  # one bool per layer
        sliding = [bool(x) for x in swa]
    else:
        p = int(swa) if isinstance(swa, int) and swa > 0 else (
            N.GEMMA3_SLIDING_PATTERN if arch == "gemma3" else N.GEMMA2_SLIDING_PATTERN)
        sliding = [(i + 1) % p != 0 for i in range(n)]
    big = n == N.GEMMA_27B_LAYERS[arch]
    out: dict[str, Any] = dict(
        sliding_window=int(m.req("attention.sliding_window")),
        layer_types=tuple("sliding_attention" if s else "full_attention" for s in sliding),
        query_pre_attn_scalar=kw["hidden_size"] // kw["num_attention_heads"] if big else kw["head_dim"],
    )
    if arch == "gemma2":
        out["attn_logit_softcapping"] = m.get("attn_logit_softcapping")
        out["final_logit_softcapping"] = m.get("final_logit_softcapping")
    else:
        out["rope_local_base_freq"] = float(m.get("rope.freq_base_swa", N.GEMMA3_LOCAL_ROPE_BASE))
    return out


def _rope_scaling(g: GGUFFile, m: _Meta, head_dim: int) -> RopeScaling | None:
    kind = m.get("rope.scaling.type")
    if kind == "linear":
        return RopeScaling("linear", float(m.req("rope.scaling.factor")))
    if kind not in (None, "none", "llama3"):
        raise CheckpointError(f"{g.path}: RoPE scaling {kind!r} is not supported (linear and llama3 are)")
    if "rope_freqs.weight" not in g.tensors:
        return None
    factors = _dequantize(g, g.tensors["rope_freqs.weight"]).reshape(-1).double().numpy()
    orig = int(m.get("rope.scaling.original_context_length") or N.LLAMA3_ORIGINAL_CONTEXT)
    return _llama3_from_factors(factors, head_dim, float(m.get("rope.freq_base", 10000.0)), orig, g.path)


def _llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float, orig: int, path) -> RopeScaling | None:
    """Recover Llama-3 RoPE scaling from llama.cpp's per-frequency divisors (the `rope_freqs` tensor)."""
    from leanfm.ops.rope import rope_inv_freq

    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv = rope_inv_freq(head_dim, theta).double().numpy()
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    lo, hi = 1.0, 4.0
    if mid.sum() >= 2:  # smooth = (orig / wavelen - lo) / (hi - lo), and 1/f = (1 - smooth)/factor + smooth
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(orig * inv[mid] / (2 * math.pi), smooth, 1)
        lo, hi = round(-b / a, 3), round((1 - b) / a, 3)
    rs = RopeScaling("llama3", round(factor, 4), lo, hi, orig)
    got = rope_inv_freq(head_dim, theta, scaling_type="llama3", factor=rs.factor, low_freq_factor=lo,
                        high_freq_factor=hi, original_max_positions=orig).double().numpy()
    if not np.allclose(inv / got, factors, rtol=1e-3):
        raise CheckpointError(f"{path}: rope_freqs tensor does not match Llama-3 RoPE scaling; unsupported")
    return rs


# --- tensors -------------------------------------------------------------------------
def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF name of a GGUF tensor, None for non-weight tensors; KeyError if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, rest = base.split(".", 2)
        if rest in N.SKIP_BLOCK:
            return None
        return f"model.layers.{int(idx)}.{N.BLOCK_NAMES[arch][rest]}.{suffix}"
    if base in N.SKIP_GLOBAL:
        return None
    return f"{N.GLOBAL_NAMES[base]}.{suffix}"


def _plan(g: GGUFFile, config: ModelConfig) -> list[tuple[TensorInfo, str]]:
    """Map, then validate names, shapes and types against the model before dequantizing anything."""
    from leanfm.models import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    plan = []
    for t in g.tensors.values():
        try:
            name = hf_tensor_name(t.name, g.arch)
        except (KeyError, ValueError):
            raise CheckpointError(f"{g.path}: unexpected tensor {t.name!r} for a {g.arch} model; "
                                  "leanfm cannot place it") from None
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"{g.path}: tensor {t.name!r} ({name}) does not belong to the configured model")
        if t.shape != expected[name]:
            raise CheckpointError(f"{g.path}: tensor {t.name!r} has shape {list(t.shape)}, the config expects "
                                  f"{list(expected[name])}; the metadata and weights disagree")
        if t.qtype not in SUPPORTED_TYPES:
            raise CheckpointError(f"{g.path}: tensor {t.name!r} uses unsupported GGUF type {t.type_name}; "
                                  f"re-quantize to one of {', '.join(_Q(q).name for q in sorted(SUPPORTED_TYPES))}")
        plan.append((t, name))
    missing = sorted(set(expected) - {name for _, name in plan})
    if missing:
        raise CheckpointError(f"{g.path}: missing tensor(s) {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}; the file is incomplete")
    return plan


def _dequantize(g: GGUFFile, t: TensorInfo, dtype: torch.dtype = torch.float32, shift: float = 0.0) -> torch.Tensor:
    """The tensor in torch layout and `dtype`, dequantized in row chunks: peak extra memory is one chunk
    (gguf's own dequantize holds a second full-size copy). `shift` is subtracted in float32."""
    from gguf.quants import dequantize

    rows = math.prod(t.shape[:-1])
    raw = np.frombuffer(g.buf, np.uint8, t.nbytes, t.offset).reshape(rows, t.nbytes // rows)
    out = torch.empty((rows, t.shape[-1]), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // t.shape[-1])
    for i in range(0, rows, step):
        a = dequantize(raw[i:i + step], _Q(t.qtype))
        a = a - np.float32(shift) if shift else (a if a.flags.writeable else a.copy())  # F32: mmap view
        out[i:i + step] = torch.from_numpy(a)
    return out.reshape(t.shape)


def _unpermute(w: torch.Tensor, t: TensorInfo, arch: str, config: ModelConfig) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row permutation (arch llama) so rotate-half RoPE applies."""
    base = t.name.rpartition(".")[0].rpartition(".")[2]
    if arch not in N.PERMUTE_QK_ARCHS or base not in ("attn_q", "attn_k"):
        return w
    n = config.num_attention_heads if base == "attn_q" else config.num_key_value_heads
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _norm_shift(t: TensorInfo, arch: str) -> float:
    """llama.cpp stores Gemma RMSNorm weights as (w + 1): every `*norm` tensor (as transformers does)."""
    return N.NORM_SHIFT.get(arch, 0.0) if t.name.rpartition(".")[0].endswith("norm") else 0.0


def load_gguf_state_dict(
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Dequantized, HF-named weights of a GGUF file, tensor by tensor (peak extra memory: one tensor)."""
    g = open_gguf(path)
    file_config = _config_from(g)  # also rejects unsupported architectures
    config = config or file_config
    plan = _plan(g, config)
    if progress:
        from tqdm.auto import tqdm

        plan = tqdm(plan, desc=f"dequantizing {g.path.name}", unit="tensor")
    sd: dict[str, torch.Tensor] = {}
    for t, name in plan:  # the permutation is exact in any dtype; the shift happens in float32
        sd[name] = _unpermute(_dequantize(g, t, dtype, _norm_shift(t, g.arch)), t, g.arch, config)
    return sd
