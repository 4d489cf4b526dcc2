"""Human-readable cost report of a ModelConfig (what `leanfm info` prints)."""

from __future__ import annotations

from pathlib import Path

from leanfm.models.config import ModelConfig
from leanfm.models.cost import flops_per_token, kv_bytes, kv_bytes_per_token, param_breakdown

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_info(c: ModelConfig, dtype: str = "float32", source: Path | str = "",
                measured: dict[str, dict[str, int]] | None = None, engine_chunk: int = 0) -> str:
    """`measured`: a compressed model's real {component: {"params", "bytes"}} (models.footprint); the
    table then shows stored bytes and bits per weight instead of params x dtype size. `engine_chunk`: the
    serving engine's prefill chunk (tokens per step), for its KV footprint with sliding layers."""
    bpp = BYTES_PER_PARAM[dtype]
    p = param_breakdown(c)
    sliding = sum(c.layer_is_sliding(i) for i in range(c.num_hidden_layers))
    lines = [
        f"model        {c.name or c.family}  ({source})",
        f"family       {c.family}; {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"FFN {c.intermediate_size} ({c.hidden_act})",
        f"attention    {c.num_attention_heads} query heads / {c.num_key_value_heads} KV heads, head_dim "
        f"{c.head_dim}" + (f", sliding window {c.sliding_window} on {sliding} of {c.num_hidden_layers} layers"
                           if sliding else "") + (", QK-norm" if c.qk_norm else ""),
        f"vocab        {c.vocab_size}; context {c.max_position_embeddings}; "
        f"{'tied' if c.tie_word_embeddings else 'separate'} LM head",
        "",
    ]
    lines += _measured_table(measured, c) if measured else _dense_table(p, c, dtype, bpp)
    lines += [
        "",
        f"FLOPs/token  {flops_per_token(c, 0) / 1e6:,.1f} MFLOP at context 0; "
        f"{flops_per_token(c, 1024) / 1e6:,.1f} at 1k; {flops_per_token(c, 8192) / 1e6:,.1f} at 8k",
        f"KV cache     {_size(kv_bytes_per_token(c, bpp))} per token ({dtype}); "
        f"{_size(kv_bytes(c, 1024, bpp))} per 1k context; {_size(kv_bytes(c, 8192, bpp))} per 8k "
        "(sliding layers hold only their window)",
    ]
    if engine_chunk and any(c.layer_is_sliding(i) for i in range(c.num_hidden_layers)):
        lines.append(f"             serving engine (prefill chunks of {engine_chunk} tokens; sliding layers also hold "
                     f"the chunk): {_size(kv_bytes(c, 8192, bpp, engine_chunk))} per 8k")
    return "\n".join(lines)


def _dense_table(p, c: ModelConfig, dtype: str, bpp: int) -> list[str]:
    lines = [f"{'component':<12}{'params':>14}{'share':>8}{'bytes (' + dtype + ')':>20}"]
    for name, n in p.as_dict().items():
        note = " (tied: shares the embedding)" if name == "head" and c.tie_word_embeddings else ""
        lines.append(f"{name:<12}{n:>14,}{n / p.total:>8.1%}{_size(n * bpp):>20}{note}")
    lines.append(f"{'total':<12}{p.total:>14,}{1:>8.0%}{_size(p.total * bpp):>20}")
    return lines


def _measured_table(m: dict[str, dict[str, int]], c: ModelConfig) -> list[str]:
    total_p = sum(v["params"] for v in m.values()) or 1
    total_b = sum(v["bytes"] for v in m.values())
    lines = [f"{'component':<12}{'weights':>14}{'share':>8}{'bytes (stored)':>20}{'bits/weight':>13}"]
    for name, v in m.items():
        bits = f"{8 * v['bytes'] / v['params']:.2f}" if v["params"] else "—"
        note = " (tied: shares the embedding)" if name == "head" and c.tie_word_embeddings and not v["bytes"] else ""
        lines.append(f"{name:<12}{v['params']:>14,}{v['params'] / total_p:>8.1%}{_size(v['bytes']):>20}"
                     f"{bits:>13}{note}")
    lines.append(f"{'total':<12}{total_p:>14,}{1:>8.0%}{_size(total_b):>20}{8 * total_b / total_p:>13.2f}")
    return lines
