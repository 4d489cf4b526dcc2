"""`leanfm serve` under load against the offline engine and llama.cpp's OpenAI-compatible server, one client.

    python benchmarks/bench_serve.py [--model gemma-3-270m] [--threads 2] [--concurrency 16] [--requests 48]
        [--prompt-tokens 128:384] [--max-tokens 64] [--llamacpp Q8_0|F16|FILE.gguf] [--skip offline,leanfm,llamacpp]

The prompts are --requests windows of the wiki eval corpus (lengths spread over --prompt-tokens), sent as
text; every request asks for --max-tokens tokens, greedy, end-of-sequence ignored (leanfm: ignore_eos;
llama.cpp: a -100 logit bias on the EOS and end-of-turn tokens), so all engines produce the same number
of tokens. Throughput = output tokens / wall time of the whole run (prefill included).

(1) offline: LLM.generate on all prompts with max_num_seqs = --concurrency (a fresh process);
(2) leanfm: `leanfm serve` (a subprocess), --concurrency streaming clients (leanfm.bench.serve_load);
(3) llama.cpp: `python -m llama_cpp.server` from llama-cpp-python[server] on the GGUF (default: the Q8_0 file
    that benchmarks/anchors/llamacpp_quant.py caches; its server runs one request at a time: it has no
    parallel slots), the same clients.
(1) and (2) alternate for --rounds rounds (medians); (3) runs once.
Targets: leanfm >= 0.9x offline, >= 2x llama.cpp. Prints one JSON object (and the load average); the
server runs also report TTFT p50/p95 and, for leanfm, that no KV block is left in use afterwards. Rates are
also given per CPU-second of the engine's process (the server's, or this one for offline): on a machine
shared with other jobs the wall clock measures the load as much as the engines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from leanfm.bench.serve_load import RequestSpec, run_load

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, ready once GET `ready_path` answers 200."""

    def __init__(self, argv: list[str], port: int, ready_path: str, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        end = time.monotonic() + 900
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{argv[:4]} did not start")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def text_prompts(tokenizer, n: int, lo: int, hi: int) -> list[str]:
    from leanfm.bench.corpora import load_corpus

    ids = tokenizer.encode(load_corpus("wiki", "eval"), add_special_tokens=False)
    lengths = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    step = max(1, (len(ids) - hi) // n)
    return [tokenizer.decode(ids[i * step:i * step + length]) for i, length in enumerate(lengths)]


def offline_worker(spec: str) -> None:
    """--offline-worker: load the model, LLM.generate the prompts, print one JSON line (a fresh process, as
    the servers get)."""
    args = json.loads(spec)
    import torch

    torch.set_num_threads(args["threads"])
    from leanfm.cli_common import load_for_inference
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    loaded = load_for_inference(args["model"], torch.float32)
    llm = LLM(loaded.model, loaded.tokenizer, max_num_seqs=args["concurrency"])
    prompts = args["prompts"]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up, as the servers get
    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(o.token_ids) for o in outs)
    ttfts = sorted(o.metrics.ttft for o in outs)
    print(json.dumps({"output_tokens": n, "wall_s": wall, "output_tok_s": n / wall, "cpu_s": cpu,
                      "output_tok_per_cpu_s": n / cpu, "ttft_p50_s": ttfts[len(ttfts) // 2],
                      "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs)}))


def run_offline(args, prompts: list[str]) -> dict:
    spec = json.dumps({"model": args.model, "threads": args.threads, "concurrency": args.concurrency,
                       "max_tokens": args.max_tokens, "prompts": prompts})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(spec)
    res = subprocess.run([sys.executable, __file__, "--offline-worker", f.name], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"the offline run failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def load(server: Server, prompts: list[str], concurrency: int, extra: dict, max_tokens: int) -> dict:
    """The same streaming clients against any server; CPU seconds of the server and of this client too."""
    warm = RequestSpec("/v1/completions", {"prompt": prompts[0][:200], "max_tokens": 4, "temperature": 0})
    asyncio.run(run_load(server.url, [warm], 1))
    specs = [RequestSpec("/v1/completions", {"prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                                             "stream": True, "stream_options": {"include_usage": True}, **extra})
             for p in prompts]
    s0, c0 = cpu_seconds(server.proc.pid), time.process_time()
    result = asyncio.run(run_load(server.url, specs, concurrency))
    server_cpu, client_cpu = cpu_seconds(server.proc.pid) - s0, time.process_time() - c0
    out = result.summary()
    out.update(server_cpu_s=server_cpu, client_cpu_s=client_cpu,
               output_tok_per_cpu_s=result.output_tokens / server_cpu if server_cpu else 0.0,
               error_samples=result.errors[:3])
    return out


def run_leanfm(args, prompts: list[str]) -> dict:
    port = free_port()
    code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
    server = Server([sys.executable, "-c", code, "serve", "--model", args.model, "--port", str(port),
                     "--threads", str(args.threads), "--max-num-seqs", str(args.concurrency),
                     "--log-level", "warning"], port, "/health", env={"PYTHONPATH": str(ROOT)})
    try:
        out = load(server, prompts, args.concurrency, {"ignore_eos": True}, args.max_tokens)
        from leanfm.server.metrics import parse

        for _ in range(100):  # the last streams may still be closing
            m = parse(httpx.get(server.url + "/metrics").text)
            used = sum(v for k, v in m.items() if k.startswith("leanfm_kv_blocks_used"))
            if not used and not m["leanfm_server_in_flight_requests"]:
                break
            time.sleep(0.1)
        out["kv_blocks_used_after"] = used
        out["prefix_cache_hit_rate"] = m["leanfm_prefix_cache_hit_rate"]
    finally:
        out_code = server.stop()
    out["exit_code"] = out_code
    return out


def llamacpp_file(args, loaded) -> Path:
    """The GGUF llama.cpp serves: a path, or a type from llamacpp_quant's cache (made there when missing)."""
    if args.llamacpp.endswith(".gguf"):
        return Path(args.llamacpp)
    from leanfm.utils.paths import cache_dir

    pattern = "F16.gguf" if args.llamacpp == "F16" else f"{args.llamacpp}.llama-cpp-python-*.gguf"
    found = sorted(cache_dir("llamacpp_quant").glob(f"{args.model}-*/{pattern}"), key=lambda p: p.stat().st_mtime)
    if found:  # reuse what llamacpp_quant cached (calling it could re-export when its sources changed)
        return found[-1]
    sys.path.insert(0, str(Path(__file__).parent))
    from anchors.llamacpp_quant import cached_files

    return cached_files(loaded, [args.llamacpp], args.threads)[args.llamacpp]


def run_llamacpp(args, prompts: list[str], gguf: Path, tokenizer) -> dict:
    port = free_port()
    n_ctx = int(args.prompt_tokens.split(":")[1]) + args.max_tokens + 64
    server = Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                     "--n_ctx", str(n_ctx), "--n_batch", "512", "--n_threads", str(args.threads),
                     "--n_threads_batch", str(args.threads), "--interrupt_requests", "False"], port, "/v1/models")
    banned = {str(i): -100.0 for i in tokenizer.stop_token_ids}
    try:
        out = load(server, prompts, args.concurrency, {"logit_bias": banned}, args.max_tokens)
    finally:
        server.stop()
    out["gguf"] = str(gguf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-tokens", default="128:384", help="LO:HI prompt lengths")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="offline and leanfm runs, alternating (medians)")
    ap.add_argument("--llamacpp", default="Q8_0", help="Q8_0 | F16 (leanfm's cached export) | a .gguf path")
    ap.add_argument("--skip", default="", help="comma-separated: offline, leanfm, llamacpp")
    ap.add_argument("--offline-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_worker:
        return offline_worker(Path(args.offline_worker).read_text())
    skip = set(filter(None, args.skip.split(",")))
    from leanfm.checkpoint.loader import load_model

    loaded = load_model(args.model, progress=False)  # for the prompts and the GGUF; the runs load their own
    lo, hi = map(int, args.prompt_tokens.split(":"))
    prompts = text_prompts(loaded.tokenizer, args.requests, lo, hi)
    result: dict = {"model": args.model, "threads": args.threads, "concurrency": args.concurrency,
                    "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                    "loadavg_start": os.getloadavg()}
    gguf = llamacpp_file(args, loaded) if "llamacpp" not in skip else None
    runs = [("offline", lambda: run_offline(args, prompts)), ("leanfm", lambda: run_leanfm(args, prompts))]
    for r in range(args.rounds):
        for name, run in runs:
            if name not in skip:
                result.setdefault(f"{name}_rounds", []).append(run())
                print(json.dumps({f"{name}_round_{r}": result[f"{name}_rounds"][-1]}), flush=True)
    if "llamacpp" not in skip:
        result["llamacpp"] = run_llamacpp(args, prompts, gguf, loaded.tokenizer)
        print(json.dumps({"llamacpp": result["llamacpp"]}), flush=True)
    ratios(result)
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


def ratios(result: dict) -> None:
    """Median rates over the rounds, and leanfm's ratios to the offline engine and to llama.cpp."""
    for key in ("output_tok_s", "output_tok_per_cpu_s"):
        rate = {k: statistics.median(r[key] for r in result[f"{k}_rounds"]) for k in ("offline", "leanfm")
                if f"{k}_rounds" in result}
        if "llamacpp" in result:
            rate["llamacpp"] = result["llamacpp"][key]
        suffix = "" if key == "output_tok_s" else "_per_cpu_s"
        for k, v in rate.items():
            result[f"{k}_median_{key}"] = v
        if "leanfm" in rate and "offline" in rate:
            result[f"leanfm_over_offline{suffix}"] = rate["leanfm"] / rate["offline"]
        if "leanfm" in rate and "llamacpp" in rate:
            result[f"leanfm_over_llamacpp{suffix}"] = rate["leanfm"] / rate["llamacpp"]


if __name__ == "__main__":
    main()
