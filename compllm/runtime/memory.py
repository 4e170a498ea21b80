"""Process memory as the compiler must plan it: resident now, peak over a window, peak over the whole run.

Why resident set size (RSS) and not `ru_maxrss`: the plan is checked against what the process really holds, and
calibration needs the peak of one load or one prefill, which takes a peak that can be reset. On Linux the kernel
keeps that peak as `VmHWM` (/proc/self/status) and resets it to the current RSS when "5" is written to
/proc/self/clear_refs. A reset would erase the run's real peak, so `reset_peak()` first folds the old peak into
`_run_peak`: `peak_memory_bytes()` stays the peak since the process started, whoever reset in between.
Elsewhere (macOS, a kernel without clear_refs) the lifetime `ru_maxrss` is used and windows cannot be measured
(`PeakWindow.exact` is False).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_lock = threading.Lock()
_run_peak = 0  # the largest peak seen before any reset


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    """Resident set size now (anonymous + file-backed pages mapped into the process, e.g. mmapped weights)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return _ru_maxrss_bytes()  # no better number: an upper bound


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak()` (or since the process started)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes()


def reset_peak() -> bool:
    """Start a new peak window at the current RSS; False where the kernel does not allow it."""
    global _run_peak
    with _lock:
        _run_peak = max(_run_peak, peak_rss_bytes())
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None


def run_peak_rss_bytes() -> int:
    """Peak resident set size since the process started, across any resets."""
    with _lock:
        return max(_run_peak, peak_rss_bytes())


def release_free_heap() -> bool:
    """Give memory that is free inside the C heap back to the kernel (glibc `malloc_trim`), so that the next
    window's start is what is really in use; False where there is no glibc."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        _libc = ctypes.CDLL(name) if name else False
    if not _libc or not hasattr(_libc, "malloc_trim"):
        return False
    _libc.malloc_trim(0)
    return True


_libc = None
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_fragmentation(mmap_threshold: int = 256 << 10) -> bool:
    """Opt-in: serve allocations of at least `mmap_threshold` bytes from their own mappings (glibc mallopt), so
    memory freed by a decode step goes back to the kernel instead of staying as heap holes.

    Why: the KV cache grows by a `torch.cat` per layer per decode step; glibc's default (a threshold that rises to
    32 MiB) serves those tensors from the heap, whose holes cannot take the next, larger ones. Measured, Qwen2.5-0.5B
    fp32, 8 rows x (620 + 96) tokens (134 MiB of KV): peak 904 MiB above the start by default, 479 MiB with
    256 KiB here. Costs page faults on every such allocation; its speed effect was not measured on a quiet machine.
    False where there is no glibc."""
    release_free_heap()  # loads _libc
    if not _libc or not hasattr(_libc, "mallopt"):
        return False
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))


def _cuda(device: str):
    """torch, when `device` is a CUDA device and CUDA is initialized; else None."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        return torch
    return None


def start_run_window() -> None:
    """Begin the run's own peak window (after the one-time stages: router fit, calibration), so the run's measured
    peak compares with the plan's; the process peak so far stays in `run_peak_rss_bytes`. Not on GPUs."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    global _window_open
    import gc

    gc.collect()
    release_free_heap()  # what calibration freed goes back to the kernel, so the window starts at what is held
    _window_open = reset_peak()


_window_open = False


def window_peak_bytes() -> int:
    """Peak since `start_run_window` (GPU: torch's peak allocation); the process peak where no window opened."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes() if _window_open else run_peak_rss_bytes()


def peak_memory_bytes() -> int:
    """GPU: torch's peak allocation on the current device; CPU: the process's peak RSS since it started."""
    torch = sys.modules.get("torch")  # never import torch just to ask: a process without it used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return run_peak_rss_bytes()


@dataclass
class PeakWindow:
    """Memory before, after and at its peak over a `with` block: `with PeakWindow() as w: load()`; then
    `w.peak_above_start` is what the block needed at most, `w.retained` what it kept, `w.peak_above_end` what it
    held only transiently.

    CPU: resident set size of the whole process, so other threads allocating meanwhile count too: measure on a
    quiet process. `exact` is False where the peak could not be reset (then `peak` is the lifetime peak).
    CUDA (`device="cuda..."`): torch's allocated bytes on the current device, peak reset at the start.
    """

    device: str = "cpu"
    start: int = 0
    end: int = 0
    peak: int = 0
    exact: bool = field(default=False)

    def _now(self) -> int:
        torch = _cuda(self.device)
        return int(torch.cuda.memory_allocated()) if torch else current_rss_bytes()

    def __enter__(self) -> "PeakWindow":
        torch = _cuda(self.device)
        if torch:
            torch.cuda.reset_peak_memory_stats()
            self.exact = True
        else:
            self.exact = reset_peak()
        self.start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self._now()
        torch = _cuda(self.device)
        self.peak = max(int(torch.cuda.max_memory_allocated()) if torch else peak_rss_bytes(), self.end)

    @property
    def retained(self) -> int:
        return self.end - self.start

    @property
    def peak_above_start(self) -> int:
        return max(self.peak - self.start, 0)

    @property
    def peak_above_end(self) -> int:
        return max(self.peak - self.end, 0)
