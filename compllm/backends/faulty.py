"""Chaos testing: a wrapper that makes any backend fail the way real deployments do, at seeded rates.

Turned on per model by config (`models.<alias>.fault_injection.enabled=true`, see conf/model/*.yaml),
so a deployment can check that retries, timeouts and partial answers behave before a real outage does.
Per call one draw picks at most one of: raise an error, report out-of-memory, or hang for `hang_s`
(past the retry timeout; a cancelled hang stops at once, as a real backend stops at its next decode step).
Per request a second draw may blank the text, which the runtime counts as a failed attempt.
"""
from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Sequence

from compllm.backends.base import (Backend, BackendError, Generation, GenerationCancelled, GenerationRequest,
                                   OnText)

KINDS = ("error", "oom", "hang", "empty")


class InjectedFault(BackendError):
    """A failure raised on purpose by fault injection."""


class InjectedOutOfMemory(MemoryError):
    """Looks like a device running out of memory (torch.cuda.OutOfMemoryError's message), raised on purpose."""


@dataclass
class FaultSettings:
    """Rates are probabilities in [0, 1]; error + oom + hang are per call and must sum to at most 1.
    Also the structured-config schema of `models.<alias>.fault_injection` (chaos testing, off by default)."""

    enabled: bool = False
    seed: int = 0
    error_rate: float = 0.0
    oom_rate: float = 0.0
    hang_rate: float = 0.0
    empty_rate: float = 0.0  # per request
    hang_s: float = 30.0

    def problems(self) -> list[str]:
        """What is out of range, phrased as the fix; empty when valid."""
        out = [f"{name}={getattr(self, name)!r} must be between 0 and 1"
               for name in ("error_rate", "oom_rate", "hang_rate", "empty_rate")
               if not 0.0 <= getattr(self, name) <= 1.0]
        per_call = self.error_rate + self.oom_rate + self.hang_rate
        if per_call > 1.0:
            out.append(f"error_rate + oom_rate + hang_rate = {per_call:g} must be at most 1")
        if self.hang_s < 0:
            out.append(f"hang_s={self.hang_s!r} must be >= 0 seconds")
        return out


class FaultyModel:
    """Wraps one loaded backend; every other attribute (name, stats, model, device, ...) is the inner one's."""

    def __init__(self, inner: Backend, settings: FaultSettings):
        problems = settings.problems()
        if problems:
            raise BackendError("fault_injection: " + "; ".join(problems))
        self.inner, self.settings = inner, settings
        self.injected: Counter[str] = Counter()  # kind -> times injected, for reports
        self._rng = random.Random(settings.seed)
        self._lock = threading.Lock()  # draws stay reproducible for a given call order

    def __getattr__(self, name: str) -> Any:  # only called for attributes this wrapper lacks
        return getattr(self.inner, name)

    def _draw(self, n: int) -> tuple[str | None, list[bool]]:
        s = self.settings
        with self._lock:
            r = self._rng.random()
            blanks = [self._rng.random() < s.empty_rate for _ in range(n)]
        kind = None
        for name, rate in (("error", s.error_rate), ("oom", s.oom_rate), ("hang", s.hang_rate)):
            if r < rate:
                kind = name
                break
            r -= rate
        return kind, blanks

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None,
                 cancel: threading.Event | None = None, on_text: OnText | None = None) -> list[Generation]:
        kind, blanks = self._draw(len(requests))
        if kind is not None:
            with self._lock:
                self.injected[kind] += 1
        if kind == "error":
            raise InjectedFault(f"injected failure in {self.inner.name}")
        if kind == "oom":
            raise InjectedOutOfMemory(f"CUDA out of memory (injected into {self.inner.name})")
        if kind == "hang" and (cancel or threading.Event()).wait(self.settings.hang_s):
            raise GenerationCancelled(f"injected hang in {self.inner.name} cancelled")
        generations = list(self.inner.generate(requests, max_live_rows=max_live_rows, cancel=cancel, on_text=on_text))
        with self._lock:
            self.injected["empty"] += sum(blanks[: len(generations)])
        return [replace(g, text="", output_tokens=0) if blank else g for g, blank in zip(generations, blanks)]
