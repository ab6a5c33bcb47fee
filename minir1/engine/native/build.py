"""Native kernels: C++ sources shipped with the package, compiled on first use with the system's C++
compiler into a per-machine cache, and loaded with ctypes.

No build step at install time and no PyTorch headers (a torch extension takes a minute to compile;
these take a second or two). The library links the OpenMP runtime PyTorch already loaded, so its
threads are PyTorch's threads. Without a compiler, or with MINIR1_NATIVE=0, `load` returns None and
callers use their PyTorch path.

The cache lives in $MINIR1_CACHE (default ~/.cache/minir1)/kernels, one file per source, compiler
flags, CPU and torch build: a machine never loads a library compiled for another.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# MINIR1_SANITIZE=1 builds with AddressSanitizer and UBSan instead (for tests: the Python process must then
# preload libasan, see tests/test_hardening.py).
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("MINIR1_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("MINIR1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minir1")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def build(name: str) -> Path:
    """Compile minir1/engine/native/<name>.cpp (if not cached) and return the shared library's path.
    Raises RuntimeError with the compiler's output on failure."""
    source = Path(__file__).parent / f"{name}.cpp"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    lib_dir = _torch_lib()
    # Link the OpenMP runtime torch ships (when it ships one), so both share one thread pool.
    link = [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"] if (lib_dir / "libgomp.so.1").exists() else []
    flags = SANITIZE_FLAGS if os.environ.get("MINIR1_SANITIZE") == "1" else FLAGS
    cmd = [cxx, *flags, str(source), *link]
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # common.h: included by every source
    key = hashlib.sha256("\0".join([source.read_text(), *headers, *cmd, _cpu_signature(),
                                     torch.__version__]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("minir1: compiling the native kernel %s into %s (once per machine, a few seconds)", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:  # e.g. Apple's clang has no OpenMP: build single-threaded instead
            serial = [c for c in cmd if c != "-fopenmp" and c not in link]
            retry = subprocess.run([*serial, "-o", str(out)], capture_output=True, text=True)
            if retry.returncode != 0:
                raise RuntimeError(f"compiling {source} failed:\n{' '.join(cmd)}\n{proc.stderr.strip()}\n"
                                   f"and without OpenMP:\n{retry.stderr.strip()}")
            log.warning("minir1: built %s without OpenMP (single-threaded): %s", name, proc.stderr.strip()[:200])
        os.replace(out, target)  # atomic: a concurrent build of the same key just wins or loses the race
    return target


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library, or None (disabled, no compiler, or a failed build: logged once)."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if enabled():
        try:
            lib = ctypes.CDLL(str(build(name)))
        except (RuntimeError, OSError) as e:
            log.warning("minir1: native kernel %r unavailable, using the PyTorch path (%s)", name, e)
    _loaded[name] = lib
    return lib
