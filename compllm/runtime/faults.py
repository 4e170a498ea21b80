"""Retries with backoff and a wall-clock timeout around one model call, so a flaky or hung expert costs a
bounded amount of time and ends as a recorded error instead of a stuck run."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from compllm.backends.base import BackendError

log = logging.getLogger(__name__)
T = TypeVar("T")
RECOVERABLE = (BackendError, RuntimeError, ValueError, TimeoutError, MemoryError)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 2  # 1 = no retry
    backoff_s: float = 0.5  # wait before attempt k+1 is backoff_s * 2**(k-1)
    timeout_s: float | None = None  # per attempt; None = no limit

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or (self.timeout_s is not None and self.timeout_s <= 0):
            raise ValueError("retry: max_attempts >= 1, backoff_s >= 0, timeout_s > 0 or null")


def _with_timeout(fn: Callable[[], T], timeout_s: float | None, what: str) -> T:
    if timeout_s is None:
        return fn()
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"compllm-call-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        # A running generate cannot be interrupted safely; it finishes in the background and is discarded.
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, what: str) -> tuple[T, int]:
    """(result, attempts used); re-raises the last error when every attempt failed."""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return _with_timeout(fn, policy.timeout_s, what), attempt
        except RECOVERABLE as exc:
            if attempt == policy.max_attempts:
                raise
            wait = policy.backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt,
                        policy.max_attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
