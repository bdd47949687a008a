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
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


def use_low_mmap_threshold(threshold: int = 65536) -> bool:
    """Set glibc malloc's mmap and trim thresholds in this process and return free heap memory
    to the system, so that large blocks are mapped on allocation and unmapped when freed and the
    resident set tracks live tensors.

    The in-process counterpart of :func:`low_mmap_threshold_env` (it undoes, for example,
    :func:`funcbo.apps.rl.batched_agent.keep_freed_memory_in_heap`). Linux/glibc only.

    Returns:
        True when the setting was applied.
    """
    return set_malloc_thresholds(threshold, threshold, trim=True)


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int, trim: bool = False) -> bool:
    """Set glibc malloc's mmap and trim thresholds (bytes) in this process; with ``trim``, also
    return free heap memory to the system. Process-wide, Linux/glibc only (elsewhere a no-op).

    Returns:
        True when both thresholds were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
    ok = mallopt(m_trim_threshold, int(trim_threshold)) == 1 and ok
    if trim:
        # free chunks kept in the heap would serve large requests without touching new pages
        malloc_trim(0)
    return bool(ok)


class PhaseMeter:
    """Time and peak memory of the named phases of one call, above the memory at its start.

    ``start()`` records the memory in use (the call's baseline); each ``with meter.phase(name):``
    resets the peak counter, runs its block and records the seconds it took and its peak memory
    minus the baseline, in MB (so a phase's figure includes what earlier phases still hold). A
    phase entered twice in one call keeps the larger peak and the summed time. On CUDA the
    device is synchronised around each phase.

    Estimators that support it (:class:`~funcbo.FuncID`) accept one as ``phase_meter`` and time
    their own phases; without one they pay nothing.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.baseline = 0
        self.phases: dict[str, dict[str, float]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Begin a call: forget earlier phases and take the current memory as the baseline."""
        self._sync()
        self.phases = {}
        self.baseline = current_bytes(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the enclosed block as phase ``name``."""
        self._sync()
        reset_peak(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - t0
            peak = max(peak_bytes(self.device) - self.baseline, 0) / 2**20
            old = self.phases.get(name)
            if old is not None:
                seconds += old["time_s"]
                peak = max(peak, old["peak_mb"])
            self.phases[name] = {"time_s": seconds, "peak_mb": peak}


__all__ = [
    "PhaseMeter",
    "current_bytes",
    "low_mmap_threshold_env",
    "peak_bytes",
    "reset_peak",
    "use_low_mmap_threshold",
]
