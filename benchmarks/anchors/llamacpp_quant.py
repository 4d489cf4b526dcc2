"""llama.cpp's own quantizer on leanfm's float base, scored on exactly leanfm's perplexity windows.

    python benchmarks/anchors/llamacpp_quant.py [--model gemma-3-270m] [--windows 8] [--ctx 512]
        [--types Q8_0,Q4_0,Q4_K_M] [--threads 2] [--corpus wiki] [--no-check] [--json OUT]

    sys.path.insert(0, "benchmarks"); from anchors.llamacpp_quant import WindowSpec, llamacpp_quant_rows
    rows = llamacpp_quant_rows("gemma-3-270m", windows=8, ctx=512)  # or a LoadedModel, spec=WindowSpec(...)

The anchor side of the compression benchmark (leanfm issue 4):
1. leanfm writes its float base as GGUF F16 (`leanfm.checkpoint.gguf_writer.write_gguf`, matrices F16,
   vectors F32; tokenizer metadata copied from the model's source GGUF);
2. llama.cpp's quantizer (`llama_cpp.llama_model_quantize`, default params: llama.cpp's own per-tensor
   type choices, no imatrix) makes Q8_0, Q4_0, Q4_K_M... from that F16 file;
3. each llama.cpp file is scored on the windows of `leanfm.bench.perplexity` (`window_token_ids`: same
   token ids, same BOS, same scored positions) from the held-out `eval` split: llama.cpp evaluates each
   window from an empty cache with all logits kept, and the NLL of every scored token is computed here in
   float64 as logsumexp(logits[j-1]) - logits[j-1, ids[j]] (`scored_nll`), as leanfm does;
4. as a consistency check (`check=True`) the F16 file itself and leanfm's float base are scored too
   (leanfm's own `perplexity`); they differ only by the F16 rounding of the matrices and llama.cpp's
   arithmetic.

Bits per weight: `bits_per_weight` = file bytes x 8 / parameters (every tensor of the file, a tied
embedding counted once, metadata and the 262k-token vocabulary included); `bpw_linear` counts only the
2-D tensors of the decoder blocks (what leanfm's `model.layers.*` recipes quantize), `bpw_embedding` the
token embedding (tied LM head). llama.cpp's K-quants need rows divisible by 256: on gemma-3-270m (640-wide
rows) "Q4_K_M" falls back to Q5_0/Q8_0 for many tensors and stores the tied embedding as Q8_0, so its file
is ~7.4 bits per weight — `tensor_types` shows the mix.

Files are cached under `~/.cache/leanfm/llamacpp_quant/<model>-<key>/`, the key hashing the float base's
files, the source GGUF and the GGUF writer's source (quantized files also name the llama-cpp-python
version), so an unchanged source is never re-exported nor re-quantized; a new key replaces the model's
older cache directories. Export, quantization and the cache are in llamacpp_quant_files.py (its names
are re-exported here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `anchors` package (benchmarks/anchors) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchors.llamacpp_quant_files import (  # noqa: E402, F401 - the file helpers are re-exported from here
    FTYPES,
    cache_key,
    cached_files,
    captured_stderr,
    export_f16,
    quantize_gguf,
    source_gguf,
    tokenizer_fields,
)

TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
NLL_CHUNK = 64  # logits rows per float64 block: 64 x 262144 x 8 B = 128 MiB


# ------------------------------------------------------------------ pure helpers
@dataclass(frozen=True)
class WindowSpec:
    """Which windows to score: the first `n_windows` windows of `ctx` tokens of a corpus split (None: all)."""

    corpus: str = "wiki"  # a built-in corpus (leanfm.bench.corpora) or a UTF-8 text file
    split: str = "eval"  # the held-out split; compression calibrates on "calib"
    ctx: int = 512
    n_windows: int | None = 8
    stride: int | None = None  # None: disjoint windows
    add_bos: bool = True

    def __post_init__(self) -> None:
        if self.n_windows is not None and (isinstance(self.n_windows, bool) or not isinstance(self.n_windows, int)
                                           or self.n_windows < 1):
            raise ValueError(f"WindowSpec.n_windows must be an integer >= 1 or None (all), got {self.n_windows!r}")
        self.perplexity_config()  # validates ctx, stride and add_bos

    def perplexity_config(self, batch_size: int = 4):
        """The PerplexityConfig whose max_tokens yields exactly `n_windows` windows (fewer if the text ends)."""
        from leanfm.bench.perplexity import PerplexityConfig

        cfg = PerplexityConfig(ctx=self.ctx, stride=self.stride, add_bos=self.add_bos, batch_size=batch_size)
        if self.n_windows is None:
            return cfg
        return PerplexityConfig(ctx=self.ctx, stride=self.stride, add_bos=self.add_bos, batch_size=batch_size,
                                max_tokens=(self.n_windows - 1) * cfg.step + cfg.width)


def scored_nll(logits: np.ndarray, ids: Sequence[int], scored: Sequence[bool], chunk: int = NLL_CHUNK) -> np.ndarray:
    """-ln p(ids[j] | ids[:j]) for every scored j, ascending, float64 (M,), from one window's logits (>= T-1, V)
    where row i predicts token i + 1 (leanfm's `scored_token_nll` for one window)."""
    ids_a, mask = np.asarray(ids, dtype=np.int64), np.asarray(scored, dtype=bool)
    if ids_a.shape != mask.shape or ids_a.ndim != 1:
        raise ValueError(f"ids {ids_a.shape} and scored {mask.shape} must be 1-D of one length")
    if mask.size and mask[0]:
        raise ValueError("the first token of a window cannot be scored")
    if logits.ndim != 2 or logits.shape[0] < len(ids_a) - 1:
        raise ValueError(f"need logits (>= {len(ids_a) - 1}, vocab), got {logits.shape}")
    pos = np.flatnonzero(mask)
    out = np.empty(pos.size, dtype=np.float64)
    for i in range(0, pos.size, chunk):
        p = pos[i : i + chunk]
        rows = np.asarray(logits[p - 1], dtype=np.float64)  # (c, V)
        top = rows.max(axis=1)
        lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        out[i : i + chunk] = lse - rows[np.arange(p.size), ids_a[p]]
    return out


def gguf_size_report(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes, parameters and bits per weight of a GGUF, overall, by tensor type and by part (fast header walk)."""
    from leanfm.checkpoint.gguf_file import open_gguf

    f = open_gguf(path)
    try:
        tensors = list(f.tensors.values())
    finally:
        f.buf.close()
    by_type: dict[str, dict[str, float]] = {}
    parts = {"embedding": [0, 0], "linear": [0, 0], "other": [0, 0]}
    for t in tensors:
        n = math.prod(t.shape)
        e = by_type.setdefault(t.type_name, {"tensors": 0, "params": 0, "bytes": 0})
        e["tensors"], e["params"], e["bytes"] = e["tensors"] + 1, e["params"] + n, e["bytes"] + t.nbytes
        part = ("embedding" if t.name.startswith(("token_embd.", "output.")) else
                "linear" if t.name.startswith("blk.") and len(t.shape) == 2 else "other")
        parts[part][0] += n
        parts[part][1] += t.nbytes
    for e in by_type.values():
        e["bpw"] = e["bytes"] * 8 / e["params"]
    params = sum(e["params"] for e in by_type.values())
    size, tensor_bytes = Path(path).stat().st_size, sum(e["bytes"] for e in by_type.values())
    return {"bytes": size, "params": params, "bits_per_weight": size * 8 / params, "tensor_bytes": tensor_bytes,
            "bpw_tensors": tensor_bytes * 8 / params,
            **{f"bpw_{k}": (b * 8 / n if n else None) for k, (n, b) in parts.items()},
            "tensor_types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["params"]))}


def source_grid_match(quantized: str | os.PathLike, source: str | os.PathLike) -> dict[str, Any]:
    """How much of a llama.cpp file re-creates the source GGUF's own quantization grid, tensor by tensor.

    The float base of a packaged model is a dequantized GGUF (gemma-3-270m: Q4_K_M), so its weights already
    lie on llama.cpp's grids (Q5_0, Q4_K, Q6_K, Q8_0). Re-quantizing with the same type rules lands on those
    grids again and is near-lossless by construction: that is not a 4-bit quantizer's achievement but an
    echo of the source. Returns, over the tensors both files hold: the share of parameters stored in the
    same type as in the source, and the SQNR (dB) of the re-quantized weights against the source's, overall
    and for the tensors whose type matched and whose did not."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def tensors(path):
        return {t.name: t for t in GGUFReader(str(path)).tensors}

    q, src = tensors(quantized), tensors(source)
    acc = {"same": [0, 0.0, 0.0], "other": [0, 0.0, 0.0]}  # params, signal energy, error energy
    for name, t in q.items():
        s = src.get(name)
        if s is None or len(t.shape) < 2:
            continue
        a = dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
        b = dequantize(s.data, s.tensor_type).astype(np.float64).ravel()
        key = "same" if t.tensor_type == s.tensor_type else "other"
        e = acc[key]
        e[0], e[1], e[2] = e[0] + a.size, e[1] + float((b * b).sum()), e[2] + float(((a - b) ** 2).sum())

    def sqnr(sig, err):
        if not sig:
            return float("nan")
        return float("inf") if err == 0 else 10 * math.log10(sig / err)

    total = sum(e[0] for e in acc.values())
    return {"params": total, "same_type_share": acc["same"][0] / total if total else float("nan"),
            "sqnr_db": sqnr(sum(e[1] for e in acc.values()), sum(e[2] for e in acc.values())),
            "sqnr_db_same_type": sqnr(acc["same"][1], acc["same"][2]),
            "sqnr_db_other_type": sqnr(acc["other"][1], acc["other"][2])}



# ------------------------------------------------------------------ scoring
def llamacpp_windows_nll(path: str | os.PathLike, input_ids: Sequence[Sequence[int]],
                         scored: Sequence[Sequence[bool]], threads: int = 2) -> dict[str, float]:
    """llama.cpp's NLL over the windows: each from an empty cache, positions from 0, all logits kept."""
    from llama_cpp import Llama

    ctx = max(len(w) for w in input_ids)
    with captured_stderr():
        llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, verbose=False)
    total, count, n_input = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        for ids, mask in zip(input_ids, scored, strict=True):
            llm.reset()
            llm.eval(list(ids))
            nll = scored_nll(llm.scores[: len(ids)], ids, mask)
            total, count, n_input = total + float(nll.sum()), count + nll.size, n_input + len(ids)
    finally:
        llm.close()
    seconds = time.perf_counter() - t0
    return {"ppl": math.exp(total / count), "nll": total / count, "n_scored_tokens": count, "seconds": seconds,
            "tokens_per_second": n_input / seconds}


def leanfm_row(lm, text: str, cfg, progress: bool = False) -> dict[str, Any]:
    """leanfm's own perplexity of the loaded (float) model on the same windows, with its in-memory size."""
    from leanfm.bench.perplexity import perplexity

    r = perplexity(lm.model, lm.tokenizer, text, cfg, progress=progress)
    params = {p.data_ptr(): p for p in lm.model.parameters()}.values()  # a tied head counted once
    n = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    dtype = str(next(iter(params)).dtype).removeprefix("torch.")
    return {"name": f"leanfm float base ({dtype})", "engine": "leanfm", "type": dtype, "bytes": size, "params": n,
            "bits_per_weight": size * 8 / n, "ppl": r.ppl, "nll": r.nll, "n_scored_tokens": r.n_scored_tokens,
            "seconds": r.seconds, "tokens_per_second": r.tokens_per_second, "protocol": r.protocol}


def llamacpp_quant_rows(model_ref="gemma-3-270m", spec: WindowSpec | None = None, types: Sequence[str] = TYPES,
                        *, windows: int | None = None, ctx: int | None = None, check: bool = False,
                        threads: int = 2, cache: Path | None = None, log=print) -> list[dict[str, Any]]:
    """One row per llama.cpp file: name (the type: "Q8_0", "Q4_0", "Q4_K_M"), engine "llama.cpp", bits_per_weight
    (and bpw_linear, bpw_embedding, tensor_types), bytes, params, ppl, nll, n_scored_tokens, path, windows.

    The windows: `spec`, or the first `windows` (8) windows of `ctx` (512) tokens of the wiki eval split.
    `model_ref`: a reference for load_model, or a LoadedModel holding the unmodified float base.
    `check`: first leanfm's own row for the float base (engine "leanfm") and llama.cpp's F16 row, and on every
    row `ppl_vs_leanfm` (ppl ratio - 1)."""
    from leanfm.bench.corpora import load_corpus
    from leanfm.bench.perplexity import window_token_ids
    from leanfm.checkpoint.loader import load_model

    if spec is not None and (windows is not None or ctx is not None):
        raise ValueError("give either spec or windows/ctx, not both")
    spec = spec or WindowSpec(n_windows=8 if windows is None else windows, ctx=512 if ctx is None else ctx)
    lm = load_model(model_ref, progress=False) if isinstance(model_ref, str) else model_ref
    wanted = list(dict.fromkeys((["F16"] if check else []) + list(types)))
    files = cached_files(lm, wanted, threads, cache, log)
    text, cfg = load_corpus(spec.corpus, spec.split), spec.perplexity_config()
    ws = window_token_ids(lm.tokenizer, text, cfg)
    rows = []
    if check:
        rows.append(leanfm_row(lm, text, cfg))
        if rows[0]["n_scored_tokens"] != ws.n_scored:
            raise RuntimeError(f"leanfm scored {rows[0]['n_scored_tokens']} tokens, its windows {ws.n_scored}")
    for qtype in wanted:
        res = llamacpp_windows_nll(files[qtype], ws.input_ids, ws.scored, threads)
        size = gguf_size_report(files[qtype])
        rows.append({"name": qtype, "engine": "llama.cpp", "type": qtype, **size, **res,
                     "path": str(files[qtype]), "source_grid": source_grid_match(files[qtype], source_gguf(lm))})
        log(f"llama.cpp {qtype}: ppl {res['ppl']:.4f} at {size['bits_per_weight']:.2f} bits/weight "
            f"({res['seconds']:.0f} s)")
    windows_info = {"corpus": spec.corpus, "split": spec.split, "ctx": spec.ctx, "n_windows": len(ws.input_ids),
                    "stride": spec.stride, "add_bos": spec.add_bos, "n_scored_tokens": ws.n_scored}
    for r in rows:
        r["windows"] = windows_info
        if check:
            r["ppl_vs_leanfm"] = r["ppl"] / rows[0]["ppl"] - 1
    return rows


# ------------------------------------------------------------------ command line
def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'':30}{'bits/weight':>12}{'linear bpw':>11}{'embed bpw':>10}{'MB':>8}{'ppl':>10}{'vs leanfm':>11}"
    lines = [head]
    for r in rows:
        lin = f"{r['bpw_linear']:.2f}" if r.get("bpw_linear") else "-"
        emb = f"{r['bpw_embedding']:.2f}" if r.get("bpw_embedding") else "-"
        vs = f"{100 * r['ppl_vs_leanfm']:+.3f}%" if "ppl_vs_leanfm" in r else "-"
        name = f"llama.cpp {r['name']}" if r["engine"] == "llama.cpp" else r["name"]
        lines.append(f"{name:30}{r['bits_per_weight']:>12.2f}{lin:>11}{emb:>10}{r['bytes'] / 1e6:>8.1f}"
                     f"{r['ppl']:>10.4f}{vs:>11}")
    for r in rows:
        if r.get("tensor_types"):
            mix = ", ".join(f"{k} {v['params'] / 1e6:.1f}M ({v['bpw']:.2f})" for k, v in r["tensor_types"].items())
            lines.append(f"  {r['type']:7} tensor types (params, bpw): {mix}")
        g = r.get("source_grid")
        if g:
            lines.append(f"  {r['type']:7} vs the source GGUF's own grid: {100 * g['same_type_share']:.0f}% of the "
                         f"matrices' weights in the source's type; SQNR {g['sqnr_db']:.1f} dB overall, "
                         f"{g['sqnr_db_same_type']:.1f} dB where the type matched")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-check", action="store_true", help="skip the F16 and leanfm float base rows")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    import llama_cpp
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = WindowSpec(corpus=args.corpus, ctx=args.ctx, n_windows=args.windows)
    rows = llamacpp_quant_rows(args.model, spec, [t for t in args.types.split(",") if t], check=not args.no_check,
                               threads=args.threads)
    w = rows[0]["windows"]
    print(f"\n{args.model}: leanfm's float base exported as GGUF F16 by leanfm, quantized by llama.cpp "
          f"(llama-cpp-python {llama_cpp.__version__}, default quantize params); perplexity on {w['n_windows']} "
          f"windows x {w['ctx']} tokens ({w['n_scored_tokens']} scored) of {w['corpus']} {w['split']}, "
          f"{args.threads} threads.\nbits/weight = file bytes x 8 / parameters; linear = decoder-block matrices; "
          "embed = token embedding (tied LM head).")
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
