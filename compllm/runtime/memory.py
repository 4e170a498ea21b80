"""Measured peak memory, reported next to the compiler's planned peak and the budget."""
from __future__ import annotations

import resource
import sys


def peak_memory_bytes() -> int:
    """GPU: torch's peak allocation on the current device; CPU: the process's peak resident set size."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
