"""Batch-1 decode: leanfm against llama.cpp at the nearest quantization, and against transformers, in one run.

    python benchmarks/bench_decode_llamacpp.py [--threads 2] [--tokens 64] [--prompt 64] [--rounds 5]
        [--pairs fp32,int8,int4,int4h8] [--no-transformers] [--engine] [--int8-act int8|fp32] [--json OUT]

Pairs (leanfm model | llama.cpp file), all from gemma-3-270m's float base (the Q4_K_M GGUF dequantized):
  fp32    leanfm float32                              | F32 GGUF written by leanfm's exporter
  int8    leanfm RTN int8 per channel, layers + head   | Q8_0 (llama.cpp's quantizer, from leanfm's F16 export)
  int4    leanfm RTN int4 g128, layers + head          | Q4_0 (llama.cpp keeps its own per-tensor rules:
  int4h8  leanfm RTN int4 g32 layers, int8 head        |   see the tensor types printed for its head)
leanfm runs the plain Generator (contiguous KV cache) and, with --engine, also the serving engine (LLM with
one request: paged KV cache, scheduler, sampler) on the same model; both after `prepare_for_inference` (C++
kernels, fused decode paths), the quantized kernels in the activation mode of --int8-act (default: the library
default). llama.cpp runs through llama-cpp-python with n_threads = n_threads_batch = --threads. transformers
runs the float32 HF directory (`generate`, greedy).

Every engine decodes --tokens tokens greedily (EOS ignored) after the same --prompt prompt tokens; the rate
is (tokens - 1) / decode time (the first token comes from the prefill). Rounds interleave all engines (so
drifting load hits all alike) and the table shows medians; the 1-minute load average is printed before and
after. GB/s = weight bytes read per token x tok/s: leanfm counts its linear layers' stored tensors (codes,
scales, zeros / float weights; the tied head once), llama.cpp the GGUF's 2-D tensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = {
    "int8": [{"method": "rtn", "bits": 8, "group_size": -1, "include": ["model.layers.*", "lm_head"]}],
    "int4": [{"method": "rtn", "bits": 4, "group_size": 128, "include": ["model.layers.*", "lm_head"]}],
    "int4h8": [{"method": "rtn", "bits": 4, "group_size": 32, "include": ["model.layers.*"]},
               {"method": "rtn", "bits": 8, "group_size": -1, "include": ["lm_head"]}],
}
LLAMA_TYPE = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0", "int4h8": "Q4_0"}


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common greedy prefix."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def linear_bytes(model) -> int:
    """Bytes of every linear layer's stored weight tensors (a tensor shared by two modules counted once)."""
    seen, total = set(), 0
    for m in model.modules():
        names = ("qweight", "scales", "zeros") if hasattr(m, "qweight") else ("weight",)
        if not (isinstance(m, torch.nn.Linear) or hasattr(m, "qweight")) or type(m).__name__ == "QuantEmbedding":
            continue
        for n in names:
            t = getattr(m, n, None)
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class Leanfm:
    def __init__(self, name: str, model, tokenizer):
        from leanfm.engine.generate import Generator
        from leanfm.engine.runtime import prepare_for_inference

        prepare_for_inference(model)
        self.name, self.gen, self.bytes = name, Generator(model, tokenizer), linear_bytes(model)

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        from leanfm.engine.params import SamplingParams

        r = self.gen.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return r.decode_tokens_per_second, list(r.token_ids)


class LeanfmEngine:
    """The serving engine (LLM: paged KV cache, scheduler, one request at a time) instead of the Generator."""

    def __init__(self, name: str, model, tokenizer):
        from leanfm.engine.llm import LLM
        from leanfm.engine.runtime import prepare_for_inference

        prepare_for_inference(model)
        self.name, self.bytes = name, linear_bytes(model)
        self.llm = LLM(model, tokenizer=tokenizer, max_num_seqs=1, enable_prefix_caching=False)

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        from leanfm.engine.params import SamplingParams

        out = self.llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        return out.metrics.decode_tokens_per_second, list(out.token_ids)


def gguf_info(path) -> tuple[int, str, dict[str, int]]:
    """(bytes of the 2-D tensors, the LM head's type, {type: count} of the blocks' 2-D tensors)."""
    from collections import Counter

    from leanfm.checkpoint.gguf_file import open_gguf

    f = open_gguf(path)
    try:
        ts = list(f.tensors.values())
    finally:
        f.buf.close()
    head = {t.name: t.type_name for t in ts if t.name in ("output.weight", "token_embd.weight")}
    blocks = Counter(t.type_name for t in ts if t.name.startswith("blk.") and len(t.shape) == 2)
    return (sum(t.nbytes for t in ts if len(t.shape) == 2), head.get("output.weight", head.get("token_embd.weight")),
            dict(blocks))


class LlamaCpp:
    def __init__(self, name: str, path: Path, threads: int, n_ctx: int):
        from anchors.llamacpp_runner import LlamaCppRunner

        self.name, self.runner = name, LlamaCppRunner(path, threads, n_ctx)
        self.bytes, self.head, self.types = gguf_info(path)

    def decode(self, ids, n):
        return self.runner.decode(ids, n)


class Transformers:
    def __init__(self, path, nbytes: int):
        from transformers import AutoModelForCausalLM

        self.name, self.bytes = "transformers fp32", nbytes
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def decode(self, ids, n):
        x = torch.tensor([ids])

        def timed(k):
            t = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
            return time.perf_counter() - t, out[0, len(ids):].tolist()

        t1, _ = timed(1)
        tn, toks = timed(n)
        return (n - 1) / (tn - t1), toks


def build(args, lm):
    from anchors.llamacpp_quant import cached_files, source_gguf, tokenizer_fields

    from leanfm.checkpoint.gguf_writer import write_gguf
    from leanfm.compress import Recipe, compress_

    pairs = args.pairs.split(",")
    files = cached_files(lm, sorted({LLAMA_TYPE[p] for p in pairs} - {"F32"}), args.threads)
    if "fp32" in pairs:
        f32 = files["F16"].with_name("F32.gguf")
        if not f32.exists():
            write_gguf(f32, lm.model.config, lm.model.state_dict(), tokenizer_fields=tokenizer_fields(
                source_gguf(lm)), qtype="F32")
        files["F32"] = f32
    n_ctx = args.prompt + args.tokens + 8
    engines, llamas = [], {}
    for p in pairs:
        if p == "fp32":
            model = lm.model
        else:
            model = copy.deepcopy(lm.model)
            compress_(model, Recipe.from_dict(RECIPES[p]), progress=False)
        t = LLAMA_TYPE[p]
        if t not in llamas:  # one llama.cpp context per file, shared by the pairs that use it
            llamas[t] = LlamaCpp(f"llama.cpp {t}", files[t], args.threads, n_ctx)
        engines.append((Leanfm(f"leanfm {p}", model, lm.tokenizer), llamas[t]))
        if args.engine:
            engines.append((LeanfmEngine(f"leanfm {p} engine", model, lm.tokenizer), llamas[t]))
    return engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", default="fp32,int8,int4,int4h8")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--engine", action="store_true", help="also run each leanfm model through the serving engine (LLM)")
    ap.add_argument("--int8-act", choices=["fp32", "int8"], help="leanfm's quantized kernels' activation mode")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leanfm.bench.corpora import load_corpus
    from leanfm.checkpoint.loader import load_model
    from leanfm.ops.kernels import quant

    if args.int8_act:
        quant.set_activation_mode(args.int8_act)
    load0 = os.getloadavg()[0]
    lm = load_model(args.model, progress=False)
    ids = lm.tokenizer.encode(load_corpus("wiki", split="eval")[:20000])[: args.prompt]
    engines = build(args, lm)
    flat = list({id(e): e for pair in engines for e in pair}.values())
    if not args.no_transformers:
        flat.append(Transformers(lm.path, engines[0][0].bytes if engines[0][0].name == "leanfm fp32"
                                 else linear_bytes(lm.model)))
    for e in flat:  # warm-up
        e.decode(ids, 8)
    rates = {e.name: [] for e in flat}
    toks = {}
    for _ in range(args.rounds):
        for e in flat:
            r, t = e.decode(ids, args.tokens)
            rates[e.name].append(r)
            toks[e.name] = t
    med = {k: statistics.median(v) for k, v in rates.items()}
    load1 = os.getloadavg()[0]
    print(f"{args.model}, {args.threads} threads, batch 1, greedy, {args.tokens} new tokens after {args.prompt} "
          f"prompt tokens; median of {args.rounds} interleaved rounds; leanfm quantized kernels: activations "
          f"{quant.activation_mode()}; 1-min load average {load0:.2f} before, {load1:.2f} after")
    print(f"{'engine':22}{'tok/s':>8}{'MB/token':>10}{'GB/s':>7}   runs")
    for e in flat:
        print(f"{e.name:22}{med[e.name]:>8.1f}{e.bytes / 1e6:>10.0f}{med[e.name] * e.bytes / 1e9:>7.1f}   "
              + " ".join(f"{r:.1f}" for r in rates[e.name]))
    print()
    for lf, lc in engines:
        agree = agreement(toks[lf.name], toks[lc.name])
        print(f"{lf.name} / {lc.name}: {med[lf.name] / med[lc.name]:.2f}x   (greedy prefix agreement {agree}/"
              f"{args.tokens}; llama.cpp head {lc.head}, block matrices {lc.types})")
    if not args.no_transformers:
        for lf, _ in engines:
            print(f"{lf.name} / transformers fp32: {med[lf.name] / med['transformers fp32']:.2f}x")
    print(f"leanfm kernel threads [regions, strikes, serial calls, backoff ns, adaptive]: "
          f"{torch.ops.leanfm_kernels.thread_stats()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "median": med, "load": [load0, load1],
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
