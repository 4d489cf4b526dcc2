"""Build the C++ kernels on first use and cache the shared library.

The library lives in `<leanfm cache>/kernels/<name>/<name>.so` where `<name>` carries a hash of the
sources, the torch and Python versions, the compiler flags and the machine type, so a new torch or
an edited kernel builds a fresh copy and a cached one loads in milliseconds (no ninja, no compiler).

The first build (~tens of seconds) takes a file lock, so processes starting together build once.
It compiles into a private temporary directory and moves the finished .so into place with one
rename: a crashed build never leaves a half-written library behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("leanfm.ops.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "skinny_fp32.cpp", "skinny_fp32_bcast.cpp", "skinny_bf16.cpp", "skinny_q8.cpp", "skinny_q4.cpp", "sparse_nm.cpp",
           "sparse_nm_ops.cpp", "parallel.cpp", "fused_math.cpp", "fused_ops.cpp", "group_ops.cpp",
           "skinny_qx.cpp", "linear_run.cpp", "decode_layer.cpp", "paged_decode.cpp", "paged_decode_ops.cpp",
           "paged_decode_layer.cpp", "dequant.cpp")
CFLAGS = ("-O3", "-fopenmp", "-Wall")  # ISA flags are per file (#pragma GCC target), see kernels.h
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str, "path": str


def library_name() -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):  # sources and headers
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    key = [torch.__version__, sys.version.split()[0], platform.machine(), *CFLAGS, *LDFLAGS, *SOURCES]
    h.update("\0".join(key).encode())
    return f"leanfm_kernels_{h.hexdigest()[:16]}"


def cache_root() -> Path:
    from leanfm.utils.paths import cache_dir

    return cache_dir("kernels")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _precheck() -> str | None:
    """Why the kernels cannot be built here, or None. Cheap: no compiler is started."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no kernels for {platform.machine()} (x86-64 with AVX2 only)"
    flags = _cpu_flags()
    if flags and not {"avx2", "fma"} <= flags:
        return "CPU lacks AVX2/FMA"
    return None


def _find_ninja() -> None:
    """pip's ninja lives next to the interpreter (or in ninja.BIN_DIR); a venv that is used without
    being activated does not have it on PATH, which is where cpp_extension looks."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(Exception):
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    for d in dirs:
        if os.access(os.path.join(d, "ninja"), os.X_OK):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _toolchain_problem() -> str | None:
    from torch.utils import cpp_extension

    _find_ninja()
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still protects us
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(name: str, final: Path) -> None:
    """Build into a temporary directory, load it, then move the .so to `final` for later processes."""
    from torch.utils import cpp_extension

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent.parent))
    try:
        built = cpp_extension.load(
            name=name,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(tmp),
            is_python_module=False,
            verbose=os.environ.get("LEANFM_KERNELS_VERBOSE") == "1",
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built if isinstance(built, str) else tmp / f"{name}.so", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load() -> bool:
    """Load (building if needed) the kernel library once per process. Never raises."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            _state["ok"] = _load_unlocked()
        except Exception as e:  # compiler errors, missing headers, bad cache...: fall back
            log.debug("kernel build/load failed", exc_info=True)
            lines = str(e).strip().splitlines()
            _state["ok"] = False
            _state["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        if not _state["ok"]:
            log.warning("leanfm C++ kernels unavailable, using torch.nn.functional.linear: %s "
                        "(LEANFM_KERNELS_VERBOSE=1 shows the build, LEANFM_KERNELS=0 skips it)",
                        _state.get("error"))
        return bool(_state["ok"])


def _load_unlocked() -> bool:
    problem = _precheck()
    if problem:
        _state["error"] = problem
        return False
    name = library_name()
    root = cache_root()
    so = root / name / f"{name}.so"
    if not so.exists():
        problem = _toolchain_problem()
        if problem:
            _state["error"] = problem
            return False
        with _file_lock(root / f"{name}.lock"):
            if not so.exists():  # somebody else may have finished it while we waited
                log.info("building leanfm C++ kernels into %s (once)", so.parent)
                _compile(name, so)
                _state["path"] = str(so)
                return _supported()
    torch.ops.load_library(str(so))
    _state["path"] = str(so)
    return _supported()


def _supported() -> bool:
    if not torch.ops.leanfm_kernels.cpu_supported():
        _state["error"] = "CPU lacks AVX2/FMA"
        return False
    return True


def status() -> dict[str, object]:
    """What load() found: {"ok": bool, "error": str, "path": str} (empty before the first load)."""
    return dict(_state)
