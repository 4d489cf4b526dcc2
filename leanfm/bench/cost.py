"""What a model costs to run here: prefill and decode speed, latency, memory, bandwidth and energy.

    cost = measure_cost(model, tokenizer, CostConfig(prefill_lengths=(128, 512), decode_batches=(1, 4)))
    cost["decode"]["1"]["tokens_per_second_total"]["median"]

Prompts are real text (a built-in passage, repeated to the length asked), clamped to the model's
context. Every timing has a warm-up and `repeats` runs reported as min / median / max. Decode runs
greedy on a contiguous KV cache with B equal-length prompts sharing positions. Call
`leanfm.engine.runtime.prepare_for_inference(model)` first, as serving would.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from leanfm.bench.system import (
    EnergyMeter,
    busy_warning,
    load_average,
    machine_bandwidth,
    peak_rss_bytes,
    reset_peak_rss,
)
from leanfm.utils.errors import LeanfmError

PASSAGE = (
    "The lighthouse keeper kept a log of every ship that passed the point, and over forty years the log "
    "grew into a history of the coast. In the early pages the entries are short: a schooner bound for the "
    "mills upriver, a fishing fleet sheltering from a gale, a steamer whose smoke could be seen long before "
    "her hull. Later the handwriting changes, the ships grow larger, and the notes about weather become "
    "careful measurements of wind, pressure and visibility. The keeper's daughter, who took over the light "
    "when her father's eyes failed, added sketches of the birds that nested on the rocks and lists of the "
    "plants that grew in the thin soil behind the tower. Scholars who read the log today use it to date "
    "changes in shipping, in the fisheries and in the climate of the region. A ledger kept for a practical "
    "purpose, to show the harbour board that the lamp had burned every night, became a record that no one "
    "had planned. Engineers who later automated the light found the old brass mechanism still oiled and "
    "wound, and they left a copy of the log in the tower, where visitors can read how a small routine, "
    "repeated faithfully, turned into knowledge about a whole stretch of sea.\n\n"
)


class CostConfigError(LeanfmError, ValueError):
    """An invalid CostConfig field (a LeanfmError for the CLI, a ValueError for the API)."""


def _positive_ints(name: str, values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise CostConfigError(f"{name} must be a non-empty list of positive integers, got {list(out)}; "
                              f"e.g. --{name.replace('_', '-')} 128,512")
    return out


@dataclass(frozen=True)
class CostConfig:
    prefill_lengths: tuple[int, ...] = (128, 512, 2048)
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_tokens: int = 64
    warmup: int = 1
    repeats: int = 3
    decode_prompt_tokens: int = 128  # prompt length each decode row starts from

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill_lengths", _positive_ints("prefill_lengths", self.prefill_lengths))
        object.__setattr__(self, "decode_batches", _positive_ints("decode_batches", self.decode_batches))
        checks = [(self.decode_tokens >= 2, f"decode_tokens must be >= 2, got {self.decode_tokens}"),
                  (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
                  (self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}"),
                  (self.decode_prompt_tokens >= 1,
                   f"decode_prompt_tokens must be >= 1, got {self.decode_prompt_tokens}")]
        for ok, message in checks:
            if not ok:
                raise CostConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def stats(values: Sequence[float]) -> dict[str, float]:
    """{"min", "median", "max"} of a non-empty sequence."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def prompt_ids(tokenizer: Any, n: int, offset: int = 0) -> list[int]:
    """`n` token ids of real text, starting `offset` tokens into the (repeated) passage."""
    one = tokenizer.encode(PASSAGE, add_special_tokens=False)
    if not one:
        raise LeanfmError("the tokenizer encodes the benchmark passage to no tokens; check the tokenizer")
    need = n + offset
    ids = one * (need // len(one) + 1)
    return ids[offset:need]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers in memory; tensors sharing storage (tied weights) count once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += key[1]
    return total


def files_bytes(paths: Iterable[str | Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    p = next(model.parameters())
    return p.dtype if p.is_floating_point() else torch.float32


def _check_vocab(ids: list[int], vocab: int) -> None:
    if ids and max(ids) >= vocab:
        raise LeanfmError(f"token id {max(ids)} is outside the model's vocabulary of {vocab}; "
                          "the tokenizer does not match the model")


@torch.inference_mode()
def _prefill_once(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """Seconds to first token for a (B, T) prompt on a fresh cache: forward, last logits, argmax."""
    from leanfm.models.interface import ContiguousKVCache, KVCacheMeta

    b, t = ids.shape
    cache = ContiguousKVCache(model.config, b, t, dtype, ids.device)
    t0 = time.perf_counter()
    pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, -1)
    hidden = model(ids, pos, KVCacheMeta(cache, 0))
    nxt = model.compute_logits(hidden[:, -1]).argmax(-1)
    nxt.tolist()  # sync
    return time.perf_counter() - t0, nxt


@torch.inference_mode()
def _decode_once(model: torch.nn.Module, ids: torch.Tensor, steps: int, dtype: torch.dtype) -> float:
    """Seconds for `steps` greedy decode steps of a (B, P) batch after its prefill (prefill not timed)."""
    from leanfm.models.interface import ContiguousKVCache, KVCacheMeta

    b, p = ids.shape
    cache = ContiguousKVCache(model.config, b, p + steps, dtype, ids.device)
    pos_all = torch.arange(p + steps, device=ids.device).unsqueeze(0).expand(b, -1)
    hidden = model(ids, pos_all[:, :p], KVCacheMeta(cache, 0))
    nxt = model.compute_logits(hidden[:, -1]).argmax(-1, keepdim=True)
    nxt.tolist()
    t0 = time.perf_counter()
    for i in range(steps):
        hidden = model(nxt, pos_all[:, p + i : p + i + 1], KVCacheMeta(cache, p + i))
        nxt = model.compute_logits(hidden[:, -1]).argmax(-1, keepdim=True)
    nxt.tolist()
    return time.perf_counter() - t0


def _repeat(fn, warmup: int, repeats: int, bar) -> list[float]:
    for _ in range(warmup):
        fn()
        bar.update(1)
    out = []
    for _ in range(repeats):
        out.append(fn())
        bar.update(1)
    return out


def _prefill(model, tokenizer, cfg: CostConfig, max_ctx: int, dtype, device, bar) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for requested in cfg.prefill_lengths:
        n = min(requested, max_ctx)
        ids = prompt_ids(tokenizer, n)
        _check_vocab(ids, model.config.vocab_size)
        x = torch.tensor([ids], device=device)
        secs = _repeat(lambda x=x: _prefill_once(model, x, dtype)[0], cfg.warmup, cfg.repeats, bar)
        out[str(requested)] = {"tokens": n, "clamped": n != requested, "seconds": stats(secs),
                               "tokens_per_second": stats([n / s for s in secs])}
    return out


def _decode(model, tokenizer, cfg: CostConfig, max_ctx: int, dtype, device, bar) -> dict[str, Any]:
    steps = min(cfg.decode_tokens, max_ctx - 1)
    p = max(1, min(cfg.decode_prompt_tokens, max_ctx - steps))
    out: dict[str, Any] = {}
    for b in cfg.decode_batches:
        rows = [prompt_ids(tokenizer, p, offset=17 * r) for r in range(b)]  # different text per row
        _check_vocab([i for r in rows for i in r], model.config.vocab_size)
        x = torch.tensor(rows, device=device)
        meter = EnergyMeter()
        for _ in range(cfg.warmup):
            _decode_once(model, x, steps, dtype)
            bar.update(1)
        meter.start()
        secs = _repeat(lambda x=x: _decode_once(model, x, steps, dtype), 0, cfg.repeats, bar)
        energy = meter.stop()
        tokens = b * steps * cfg.repeats
        out[str(b)] = {
            "batch": b, "prompt_tokens": p, "new_tokens": steps, "seconds": stats(secs),
            "tokens_per_second_per_sequence": stats([steps / s for s in secs]),
            "tokens_per_second_total": stats([b * steps / s for s in secs]),
            "seconds_per_output_token": stats([s / steps for s in secs]),
            "energy": {**energy, "joules_per_token": energy["joules"] / tokens, "tokens": tokens},
        }
    return out


def _bandwidth(model: torch.nn.Module, decode: dict[str, Any], machine_gb_s: float | None) -> dict[str, Any]:
    from leanfm.models.footprint import footprint

    # stored bytes, packed forms included (models.footprint); the LM head is read in full every token,
    # from the embedding's storage when tied
    fp = footprint(model)
    n_params, n_bytes = sum(v["params"] for v in fp.values()), sum(v["bytes"] for v in fp.values())
    bytes_per_param = n_bytes / n_params if n_params else 4.0
    per_token = float(sum(fp[c]["bytes"] for c in ("attention", "ffn", "norms"))
                      + (fp["head"]["bytes"] or fp["embedding"]["bytes"]))
    out: dict[str, Any] = {"weight_bytes_per_token": per_token, "bytes_per_param": bytes_per_param,
                           "achieved_gb_s": None, "machine_gb_s": machine_gb_s, "fraction": None}
    if "1" in decode:
        tps = decode["1"]["tokens_per_second_per_sequence"]["median"]
        out["achieved_gb_s"] = per_token * tps / 1e9
        if machine_gb_s:
            out["fraction"] = out["achieved_gb_s"] / machine_gb_s
    return out


def measure_cost(model: torch.nn.Module, tokenizer: Any, config: CostConfig | None = None, *,
                 weight_files: Sequence[str | Path] = (), machine_gb_s: float | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Measure prefill/decode speed, TTFT/TPOT, peak RSS, model bytes, weight bandwidth and J/token.

    `weight_files`: the files the weights were loaded from (their total is the on-disk size).
    `machine_gb_s`: the machine's memory bandwidth; measured once per process (2 threads) when None.
    """
    from tqdm import tqdm

    cfg = config or CostConfig()
    max_ctx = int(model.config.max_position_embeddings)
    dtype, device = _model_dtype(model), next(model.parameters()).device
    t_start, load_start = time.perf_counter(), load_average()
    if machine_gb_s is None:
        machine_gb_s = machine_bandwidth(2)["gb_s"]
    peak_reset = reset_peak_rss()  # after the bandwidth buffers are freed: the peak is the model's running
    runs = (cfg.warmup + cfg.repeats) * (len(cfg.prefill_lengths) + len(cfg.decode_batches))
    with tqdm(total=runs, desc="bench", unit="run", disable=not progress, leave=False) as bar:
        prefill = _prefill(model, tokenizer, cfg, max_ctx, dtype, device, bar)
        decode = _decode(model, tokenizer, cfg, max_ctx, dtype, device, bar)
    first = prefill[str(cfg.prefill_lengths[0])]
    b1 = decode.get("1")
    energy_batch = "1" if b1 else str(cfg.decode_batches[0])
    energy = decode[energy_batch]["energy"]
    return {
        "config": cfg.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prefill": prefill,
        "decode": decode,
        "ttft_seconds": {"prompt_tokens": first["tokens"], **first["seconds"]},
        "tpot_seconds": b1["seconds_per_output_token"] if b1 else None,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_reset": peak_reset,
                   "model_bytes": model_bytes(model),
                   "disk_bytes": files_bytes(weight_files) if weight_files else None},
        "bandwidth": _bandwidth(model, decode, machine_gb_s),
        "energy": {"joules_per_token": energy["joules_per_token"], "energy_source": energy["energy_source"],
                   "assumption": energy["assumption"], "batch": int(energy_batch)},
        "wall_seconds": time.perf_counter() - t_start,
        "load_avg_1m": {"start": load_start, "end": (load_end := load_average())},
        "warnings": [w for w in [busy_warning(max((x for x in (load_start, load_end) if x is not None),
                                                  default=None))] if w],
    }
