"""Decode-time linear layers of Gemma 3 270M: torch F.linear vs the leanfm C++ kernels.

    python benchmarks/bench_gemv.py [--threads 2] [--rows 1] [--dtypes fp32,bf16] [--rounds 7]
                                    [--quant q8,q4] [--group-size 32]

For each (out, in) shape the weights are many fresh copies (>= --pool-mb per shape, well past the
32 MB L3), visited round-robin, so every call streams its weights from DRAM as in a real model
whose ~1 GB of weights cannot stay in cache. Torch and leanfm runs are interleaved round by round
and the median (or --stat min) is reported, since a shared machine's bandwidth drifts over
seconds; --wait-idle waits for the other processes to go quiet before each timed pass.

GB/s counts weight bytes only. The "per token" row sums the shapes as one decode step of the real
model (18 layers x q,k,v,o,gate,up,down + the LM head) and gives the linear-layer-only token rate.

The q8 / q4 sections time the weight-only quantized kernels (leanfm.ops.kernels.quant.linear_quant,
codes + fp32 scales and zeros per --group-size weights; their bytes count towards GB/s) against the
leanfm fp32 kernel and torch's F.linear on the same shape in fp32, interleaved the same way; the
quantized kernel in both activation modes: "x32" (x in fp32, codes converted to floats) and "x8" (x
quantized to int8 per block of 32, integer dot products). --group-size -1 is per channel (group = K).

--sparse fp32,bf16 times the 2:4-sparse kernel (leanfm.ops.kernels.sparse.linear_nm: kept values in that
dtype + 2-bit indices, bytes count values and indices) against the leanfm fp32 kernel on the same shape
(an fp32 weight), interleaved the same way; the tied LM head stays dense in a 2:4 model and is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from leanfm.ops import kernels
from leanfm.ops.kernels.quant import linear_quant, pack_codes, set_activation_mode
from leanfm.ops.kernels.sparse import linear_nm
from leanfm.ops.sparsity import nm_compress, nm_mask, pack_indices_2bit

# name, out_features, in_features, uses per token (Gemma 3 270M: 18 layers, tied 262144-token head)
SHAPES = [
    ("q_proj", 1024, 640, 18),
    ("k_proj", 256, 640, 18),
    ("v_proj", 256, 640, 18),
    ("o_proj", 640, 1024, 18),
    ("gate_proj", 2048, 640, 18),
    ("up_proj", 2048, 640, 18),
    ("down_proj", 640, 2048, 18),
    ("lm_head", 262144, 640, 1),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANT_BITS = {"q8": 8, "q4": 4}


def make_pool(n: int, k: int, dtype: torch.dtype, pool_mb: float) -> list[torch.Tensor]:
    per = n * k * torch.finfo(dtype).bits // 8
    count = max(2, int(pool_mb * 2**20 // per) + 1)
    return [torch.randn(n, k).to(dtype) for _ in range(count)]


def _cpu_idle_fraction(dt: float = 0.2) -> float:
    def read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)

    i0, t0 = read()
    time.sleep(dt)
    i1, t1 = read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_idle(timeout: float) -> None:
    """On a shared machine: wait (up to timeout s) until the CPUs are >= 85% idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _cpu_idle_fraction() >= 0.85:
                return
        except OSError:
            return


def make_quant_pool(n: int, k: int, bits: int, group_size: int, pool_mb: float) -> list[tuple]:
    """Copies of (qweight, scales, zeros) in the leanfm storage format, >= pool_mb in all."""
    per = n * k * bits // 8 + 8 * n * (k // group_size)
    count = max(2, int(pool_mb * 2**20 // per) + 1)
    pool = []
    for _ in range(count):
        q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        scales = torch.rand(n, k // group_size) * 0.01
        pool.append((pack_codes(q, bits), scales, torch.full_like(scales, 2.0 ** (bits - 1))))
    return pool


def time_pass(fn, x: torch.Tensor, pool: list, idle_wait: float = 0.0) -> float:
    """Seconds per call, one call per weight copy."""
    if idle_wait:
        wait_idle(idle_wait)
    t0 = time.perf_counter()
    for w in pool:
        fn(x, w)
    return (time.perf_counter() - t0) / len(pool)


def run_impls(impls: dict, x: torch.Tensor, rounds: int, idle_wait: float, stat: str) -> dict:
    """impls: name -> (fn(x, w), pool of w, bytes per w). Returns name -> (seconds, GB/s)."""
    for fn, pool, _ in impls.values():  # warm-up: page-in, thread pool start, library load
        time_pass(fn, x, pool[:2])
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, (fn, pool, _) in impls.items():
            times[name].append(time_pass(fn, x, pool, idle_wait))
    out = {}
    for name, ts in times.items():
        t = statistics.median(ts) if stat == "median" else min(ts)
        out[name] = (t, impls[name][2] / t / 1e9)
    return out


def bench_shape(n, k, dtype, rows, rounds, pool_mb, idle_wait, stat):
    pool = make_pool(n, k, dtype, pool_mb)
    x = torch.randn(rows, k).to(dtype)
    nbytes = n * k * pool[0].element_size()
    impls = {"torch": (F.linear, pool, nbytes), "leanfm": (kernels.linear, pool, nbytes)}
    return run_impls(impls, x, rounds, idle_wait, stat)


def bench_quant_shape(n, k, bits, group_size, rows, rounds, pool_mb, idle_wait, stat):
    """torch F.linear (fp32), the leanfm fp32 kernel and the leanfm quantized kernel (x32 and x8)."""
    group_size = k if group_size == -1 else group_size
    pool = make_pool(n, k, torch.float32, pool_mb)
    qpool = make_quant_pool(n, k, bits, group_size, pool_mb)
    x = torch.randn(rows, k)
    qbytes = n * k * bits // 8 + 8 * n * (k // group_size)

    def quant(act):
        def fn(x, w):
            set_activation_mode(act)
            return linear_quant(x, *w, bits, group_size)
        return fn

    impls = {
        "torch": (F.linear, pool, n * k * 4),
        "fp32": (kernels.linear, pool, n * k * 4),
        "x32": (quant("fp32"), qpool, qbytes),
        "x8": (quant("int8"), qpool, qbytes),
    }
    try:
        return run_impls(impls, x, rounds, idle_wait, stat), qbytes
    finally:
        set_activation_mode(None)


def make_sparse_pool(n: int, k: int, dtype: torch.dtype, pool_mb: float) -> list[tuple]:
    """Copies of (values, packed indices) of a 2:4-sparse (n, k) weight, >= pool_mb in all."""
    per = n * k // 2 * torch.finfo(dtype).bits // 8 + n * k // 8
    count = max(2, int(pool_mb * 2**20 // per) + 1)
    base = []
    for _ in range(min(count, 4)):  # nm_compress is slow: a few distinct weights, then copies
        w = torch.randn(n, k)
        values, idx = nm_compress(w * nm_mask(w.abs(), 2, 4), 2, 4)
        base.append((values.to(dtype).contiguous(), pack_indices_2bit(idx).contiguous()))
    return [tuple(t.clone() for t in base[i % len(base)]) for i in range(count)]


def bench_sparse(dname: str, args, wanted: set[str]) -> None:
    dtype = DTYPES[dname]
    print(f"\n2:4 {dname}: kept values in {dname} + 2-bit indices; fp32 times the same shape with a dense fp32 weight")
    print(f"2:4 {dname}: {'shape':>10} {'(out, in)':>14} | {'fp32 ms':>9} {'GB/s':>6} | {'2:4 ms':>9} {'GB/s':>6} | "
          f"speedup (byte ratio)")
    tok = {"fp32": 0.0, "2:4": 0.0}
    for name, n, k, uses in SHAPES:
        if name == "lm_head" or (wanted and name not in wanted):
            continue
        sbytes = n * k // 2 * torch.finfo(dtype).bits // 8 + n * k // 8
        impls = {"fp32": (kernels.linear, make_pool(n, k, torch.float32, args.pool_mb), n * k * 4),
                 "2:4": (lambda x, w, k=k: linear_nm(x, w[0], w[1], 2, 4, k),
                         make_sparse_pool(n, k, dtype, args.pool_mb), sbytes)}
        r = run_impls(impls, torch.randn(args.rows, k), args.rounds, args.wait_idle, args.stat)
        (ft, fg), (st, sg) = r["fp32"], r["2:4"]
        print(f"2:4 {dname}: {name:>10} {f'({n}, {k})':>14} | {ft * 1e3:9.3f} {fg:6.1f} | {st * 1e3:9.3f} {sg:6.1f} | "
              f"{ft / st:5.2f}x ({n * k * 4 / sbytes:.2f}x)")
        tok["fp32"] += ft * uses
        tok["2:4"] += st * uses
    if not wanted:
        print(f"2:4 {dname}: {'decoder layers per token':>25} | {tok['fp32'] * 1e3:9.2f} ms fp32, "
              f"{tok['2:4'] * 1e3:9.2f} ms 2:4 | {tok['fp32'] / tok['2:4']:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (batch * new tokens)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, may be empty")
    ap.add_argument("--quant", default="q8,q4", help="weight-only quantized kernels to time (q8, q4)")
    ap.add_argument("--group-size", type=int, default=32, help="quantization group size")
    ap.add_argument("--sparse", default="", help="2:4-sparse kernel with these value dtypes (fp32, bf16)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pool-mb", type=float, default=320.0, help="weight copies per shape, MB")
    ap.add_argument("--shapes", default="", help="comma-separated subset of shape names")
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="shared machine: before each pass wait up to S s for the CPUs to go idle")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ok = kernels.warmup()
    print(f"leanfm kernels: {'ok' if ok else 'UNAVAILABLE'} (load {time.perf_counter() - t0:.2f} s) "
          f"{kernels.status().get('error') or ''}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.rows}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.stat} of {args.rounds} rounds")
    if args.rows > kernels.max_rows():
        print(f"note: rows {args.rows} > LEANFM_KERNELS_MAX_ROWS={kernels.max_rows()}: leanfm falls back to "
              "F.linear; raise LEANFM_KERNELS_MAX_ROWS to time the kernel itself")
    wanted = set(filter(None, args.shapes.split(",")))
    for dname in filter(None, args.dtypes.split(",")):
        dtype = DTYPES[dname]
        print(f"\n{dname}: {'shape':>10} {'(out, in)':>14} | {'torch ms':>9} {'GB/s':>6} | "
              f"{'leanfm ms':>9} {'GB/s':>6} | speedup")
        tok = {"torch": 0.0, "leanfm": 0.0}
        nbytes = 0
        for name, n, k, uses in SHAPES:
            if wanted and name not in wanted:
                continue
            r = bench_shape(n, k, dtype, args.rows, args.rounds, args.pool_mb, args.wait_idle, args.stat)
            (tt, tg), (lt, lg) = r["torch"], r["leanfm"]
            print(f"{dname}: {name:>10} {f'({n}, {k})':>14} | {tt * 1e3:9.3f} {tg:6.1f} | "
                  f"{lt * 1e3:9.3f} {lg:6.1f} | {tt / lt:5.2f}x")
            tok["torch"] += tt * uses
            tok["leanfm"] += lt * uses
            nbytes += n * k * (torch.finfo(dtype).bits // 8) * uses
        if not wanted:
            tt, lt = tok["torch"], tok["leanfm"]
            print(f"{dname}: {'per token':>10} {f'{nbytes / 1e6:.0f} MB':>14} | {tt * 1e3:9.2f} "
                  f"{nbytes / tt / 1e9:6.1f} | {lt * 1e3:9.2f} {nbytes / lt / 1e9:6.1f} | {tt / lt:5.2f}x"
                  f"   (linears only: {1 / tt:.1f} vs {1 / lt:.1f} tok/s)")

    for qname in filter(None, args.quant.split(",")):
        bench_quant(qname, QUANT_BITS[qname], args, wanted)
    for dname in filter(None, args.sparse.split(",")):
        bench_sparse(dname, args, wanted)


def bench_quant(qname: str, bits: int, args, wanted: set[str]) -> None:
    print(f"\n{qname}: {bits}-bit codes, fp32 scales and zeros per {args.group_size} weights; "
          "torch and fp32 time the same shape with an fp32 weight")
    print(f"{qname}: {'shape':>10} {'(out, in)':>14} | {'torch ms':>9} | {'fp32 ms':>9} {'GB/s':>6} | "
          f"{'x32 ms':>9} {'GB/s':>6} | {'x8 ms':>9} {'GB/s':>6} | x8 vs x32, fp32, torch")
    tok = {"torch": 0.0, "fp32": 0.0, "x32": 0.0, "x8": 0.0}
    nbytes = 0
    for name, n, k, uses in SHAPES:
        if wanted and name not in wanted:
            continue
        r, qbytes = bench_quant_shape(n, k, bits, args.group_size, args.rows, args.rounds, args.pool_mb,
                                      args.wait_idle, args.stat)
        (tt, _), (ft, fg), (qt, qg), (q8, q8g) = r["torch"], r["fp32"], r["x32"], r["x8"]
        print(f"{qname}: {name:>10} {f'({n}, {k})':>14} | {tt * 1e3:9.3f} | {ft * 1e3:9.3f} {fg:6.1f} | "
              f"{qt * 1e3:9.3f} {qg:6.1f} | {q8 * 1e3:9.3f} {q8g:6.1f} | {qt / q8:5.2f}x {ft / q8:5.2f}x "
              f"{tt / q8:5.2f}x")
        for key, t in (("torch", tt), ("fp32", ft), ("x32", qt), ("x8", q8)):
            tok[key] += t * uses
        nbytes += qbytes * uses
    if not wanted:
        tt, ft, qt, q8 = tok["torch"], tok["fp32"], tok["x32"], tok["x8"]
        print(f"{qname}: {'per token':>10} {f'{nbytes / 1e6:.0f} MB':>14} | {tt * 1e3:9.2f} | {ft * 1e3:9.2f} "
              f"{'':>6} | {qt * 1e3:9.2f} {nbytes / qt / 1e9:6.1f} | {q8 * 1e3:9.2f} {nbytes / q8 / 1e9:6.1f} | "
              f"{qt / q8:5.2f}x {ft / q8:5.2f}x {tt / q8:5.2f}x   (linears only: x32 {1 / qt:.1f}, "
              f"x8 {1 / q8:.1f} tok/s)")


if __name__ == "__main__":
    main()
