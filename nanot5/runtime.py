"""Process-level CPU performance settings, applied once by the entry points (training, benchmarks).

`tune_cpu_runtime()` keeps glibc's malloc from handing freed memory back to the OS. A training
step allocates and frees the same large activation buffers every step; by default glibc serves
blocks above a (dynamic, at most 32 MiB) threshold with mmap and returns them with munmap on
free, so every step page-faults and zero-fills hundreds of MiB again (measured on a 2-core Zen4:
1.3-1.6x slower bf16 T5 steps). Keeping freed memory in the heap removes that cost; the price is
that the process's resident size stays at its high-water mark, which a training process reaches
within one step anyway.

Opt out with the environment variable NANOT5_NO_MALLOC_TUNING=1 (e.g. when linking jemalloc or
tcmalloc via LD_PRELOAD, or when sharing memory with other processes matters more than speed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_applied: dict[str, Any] | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl, e.g. Alpine, does not)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS; True if applied.

    M_MMAP_MAX=0 serves every block from the heap (no per-allocation mmap/munmap), and a huge
    M_TRIM_THRESHOLD stops free() from shrinking the heap; M_TOP_PAD grows it in 64 MiB steps.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= libc.mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def tune_cpu_runtime() -> dict[str, Any]:
    """Apply the process-wide CPU settings once (later calls return the first result).

    Returns what was applied, e.g. {"malloc": True, "threads": 2}, for logging.
    Thread count is left to torch (one thread per physical core) unless OMP_NUM_THREADS is set.
    """
    global _applied
    if _applied is not None:
        return _applied
    import torch

    malloc = False
    if os.environ.get("NANOT5_NO_MALLOC_TUNING", "0") in ("", "0"):
        malloc = tune_malloc()
    _applied = {"malloc": malloc, "threads": torch.get_num_threads()}
    return _applied
