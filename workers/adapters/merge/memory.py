"""Host and device memory figures of a merge: peak RSS, what is free, and giving freed memory back."""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path
from typing import Any


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim).

    Tensors of a few MB come from the heap rather than their own mappings; without a trim, each shard's freed
    tensors leave holes that the next shard's do not fit exactly, and the process's RSS creeps up shard by shard.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False  # not glibc (musl, macOS): nothing to do
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def reset_peak_rss() -> bool:
    """Start the peak-RSS figure afresh (Linux: clear_refs 5 resets the high-water mark getrusage reports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The process's high-water RSS. Linux: /proc's VmHWM, which is never below the RSS of the same moment
    (getrusage's figure is updated lazily and can read below an RSS sampled earlier); elsewhere getrusage."""
    high_water = proc_kib_field("/proc/self/status", "VmHWM")
    if high_water:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def proc_kib_field(path: str, key: str) -> int:
    """A "Key:   123 kB" line of a /proc file, in bytes; 0 where the file or the line is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return proc_kib_field("/proc/self/status", "VmRSS")


def readable_size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def available_host_bytes() -> int:
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def release_memory() -> None:
    """Give back what a model just deleted held (host memory, and the CUDA cache)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
