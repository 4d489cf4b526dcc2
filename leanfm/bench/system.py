"""Facts about the machine a measurement ran on, and the meters the cost harness reads.

    machine_info()                  # CPU model, flags of interest, cores, torch threads, RAM
    measure_memory_bandwidth()      # STREAM-like copy / triad, GB/s (the batch-1 decode bound)
    reset_peak_rss(); ...; peak_rss_bytes()
    with EnergyMeter() as meter: ...
    meter.reading()                 # {"joules", "energy_source": "rapl" | "estimate", "assumption", ...}

Energy comes from RAPL counters (/sys/class/powercap, Intel and AMD) when they are readable. Otherwise
it is an ESTIMATE: process CPU time x an assumed watts-per-busy-core figure, labelled as such.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

from leanfm.utils.rss import reset_peak_rss  # noqa: F401  (re-exported)

FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                     "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
POWERCAP = Path("/sys/class/powercap")
# Assumed power of one fully busy core (package share, incl. uncore) when no RAPL counter is readable.
# A server core draws roughly 3-6 W, a desktop core 8-15 W; override with $LEANFM_WATTS_PER_CORE.
DEFAULT_WATTS_PER_CORE = 5.0


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"model", "flags" (those of interest present), "logical_cores", "physical_cores"}."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    physical = None
    if info.get("cpu cores", "").isdigit():
        physical = int(info["cpu cores"])
    return {
        "model": model,
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
    }


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS does not report it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def busy_warning(load: float | None) -> str | None:
    """A warning when other work competes for the CPU (load above the core count): timings are unreliable."""
    cores = os.cpu_count() or 1
    if load is not None and load > cores:
        return (f"the machine was busy (1-min load {load:.1f} on {cores} logical cores): timings and energy "
                "are inflated by other processes; re-run on an idle machine for numbers to publish")
    return None


def machine_info() -> dict[str, Any]:
    """CPU facts plus torch threads, total RAM, load, OS and Python (cheap; no measurement)."""
    import torch

    return {
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _meminfo_bytes("MemTotal"),
        "load_avg_1m": load_average(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


# ------------------------------------------------------------------ memory bandwidth
def measure_memory_bandwidth(buffer_mib: int = 128, threads: int = 2, repeats: int = 5) -> dict[str, Any]:
    """STREAM-like copy (b = a) and triad (a = b + s*c) over three fp32 buffers of `buffer_mib` MiB each.

    Bytes are counted the STREAM way (2 words per element for copy, 3 for triad; no write-allocate).
    Returns {"copy_gb_s", "triad_gb_s", "gb_s" (the better of the two), "threads", "buffer_bytes"};
    each figure is the best of `repeats` runs. Buffers must exceed the last-level cache.
    """
    import torch

    if buffer_mib < 1 or threads < 1 or repeats < 1:
        raise ValueError("buffer_mib, threads and repeats must be >= 1")
    n = buffer_mib * 1024 * 1024 // 4
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = _stream(n, repeats)
    finally:
        torch.set_num_threads(before)
    return {"copy_gb_s": best["copy"], "triad_gb_s": best["triad"], "gb_s": max(best.values()),
            "threads": threads, "buffer_bytes": n * 4}


def _stream(n: int, repeats: int) -> dict[str, float]:
    import torch

    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.full((n,), 0.5)  # touched: pages mapped
    kernels = {"copy": (lambda: b.copy_(a), 2), "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3)}
    best = {}
    for name, (fn, words) in kernels.items():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = words * n * 4 / min(times) / 1e9
    return best


@functools.lru_cache(maxsize=4)
def machine_bandwidth(threads: int = 2) -> dict[str, Any]:
    """measure_memory_bandwidth(threads=threads), measured once per process."""
    return measure_memory_bandwidth(threads=threads)


# ------------------------------------------------------------------ resident memory
def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None




def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last successful reset_peak_rss)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


# ------------------------------------------------------------------ energy
def rapl_zones(root: Path = POWERCAP) -> list[Path]:
    """Top-level RAPL zones whose counter is readable (package domains; sub-zones and psys would double count)."""
    if not root.is_dir():
        return []
    zones = []
    for zone in sorted(root.iterdir()):
        if not re.fullmatch(r"[a-z-]*rapl:\d+", zone.name) or "mmio" in zone.name:
            continue
        try:
            name = (zone / "name").read_text().strip() if (zone / "name").exists() else ""
            int((zone / "energy_uj").read_text())
        except (OSError, ValueError):
            continue
        if name != "psys":
            zones.append(zone)
    return zones


def _read_uj(zone: Path) -> int:
    return int((zone / "energy_uj").read_text())


def _max_range_uj(zone: Path) -> int | None:
    try:
        return int((zone / "max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return None


def counter_delta(start: int, end: int, max_range: int | None) -> int:
    """end - start for a counter that wraps to 0 after max_range."""
    delta = end - start
    if delta < 0 and max_range:
        delta += max_range + 1
    return max(delta, 0)


class EnergyMeter:
    """Energy used between start() and stop() (or a `with` block), in joules, with its source."""

    def __init__(self, watts_per_core: float | None = None, root: Path = POWERCAP) -> None:
        env = os.environ.get("LEANFM_WATTS_PER_CORE")
        self.watts_per_core = watts_per_core or (float(env) if env else DEFAULT_WATTS_PER_CORE)
        self.zones = rapl_zones(root)
        self._start: dict[Path, int] = {}
        self._wrap: dict[Path, int] = {}
        self._elapsed: dict[Path, int] = {}
        self._t0 = self._cpu0 = 0.0
        self.wall_seconds = self.cpu_seconds = 0.0

    def start(self) -> EnergyMeter:
        self._start = {z: _read_uj(z) for z in self.zones}
        self._wrap = {z: _max_range_uj(z) or 0 for z in self.zones}
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> dict[str, Any]:
        self.wall_seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0
        self._elapsed = {}
        for z, s in self._start.items():
            try:
                self._elapsed[z] = counter_delta(s, _read_uj(z), self._wrap.get(z))
            except (OSError, ValueError):
                self._elapsed = {}
                break
        return self.reading()

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reading(self) -> dict[str, Any]:
        """{"joules", "energy_source", "assumption", "wall_seconds", "cpu_seconds", "domains"}."""
        if self._elapsed:
            return {"joules": sum(self._elapsed.values()) / 1e6, "energy_source": "rapl", "assumption": None,
                    "wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds,
                    "domains": [z.name for z in self._elapsed],
                    "note": "whole CPU package(s): includes other processes running at the same time"}
        return {"joules": self.cpu_seconds * self.watts_per_core, "energy_source": "estimate",
                "assumption": (f"ESTIMATE: no readable RAPL counter; {self.watts_per_core:g} W per busy core x "
                               f"{self.cpu_seconds:.2f} CPU-seconds of this process"),
                "wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds, "domains": []}
