"""Peak-memory measurement on CPU (process resident set) and CUDA (allocator statistics).

On Linux the CPU high-water mark (VmHWM) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so the peak of one piece of work is measurable inside a process. Set
``MALLOC_MMAP_THRESHOLD_`` low (the benchmarks use 65536) so that freed tensors go back to the
system and the resident set tracks live memory.
"""

from __future__ import annotations

import os
import resource
import sys

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Reset the peak-memory counter; False when the platform cannot (peak is then lifetime)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_bytes(device: torch.device | str | None = None) -> int:
    """Memory in use now: CUDA allocated bytes, or the process resident set on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.memory_allocated(dev))
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_bytes(dev)


def peak_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory since the last :func:`reset_peak` (or process start)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def low_mmap_threshold_env() -> dict[str, str]:
    """Environment for a child process whose resident set tracks live tensors closely."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


__all__ = ["current_bytes", "low_mmap_threshold_env", "peak_bytes", "reset_peak"]
