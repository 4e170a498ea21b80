"""Retries with backoff and a wall-clock timeout around one model call, so a flaky or hung expert costs a
bounded amount of time and ends as a recorded error instead of a stuck run.

An empty generation counts as a failed attempt: an empty answer quoted into a dependent's prompt, or
handed to the aggregator, would be a silent wrong answer. Only the requests that came back empty are asked
again (the rest of their batch keeps its answers); one still empty after every attempt fails alone."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from compllm.backends.base import BackendError, Generation, GenerationRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
RECOVERABLE = (BackendError, RuntimeError, ValueError, TimeoutError, MemoryError)


class EmptyGenerationError(BackendError):
    """The model returned no text (only whitespace) for a request."""


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


@dataclass(frozen=True)
class CallOutcome:
    """What one request of a (batched) call ended with: a generation, or the error of its last attempt."""

    generation: Generation | None
    error: str  # "" when `generation` is set
    attempts: int  # model calls this request took part in

    @property
    def ok(self) -> bool:
        return self.generation is not None


def generate_with_retry(generate: Callable[[list[GenerationRequest]], Sequence[Generation]],
                        requests: Sequence[GenerationRequest], policy: RetryPolicy, what: str) -> list[CallOutcome]:
    """One outcome per request. A failed call is retried for every request still pending; an empty
    generation is retried for its own request only. Never raises for RECOVERABLE errors."""
    pending = list(range(len(requests)))
    generations: list[Generation | None] = [None] * len(requests)
    errors = [""] * len(requests)
    attempts = [0] * len(requests)
    for attempt in range(1, policy.max_attempts + 1):
        batch = [requests[i] for i in pending]
        try:
            got = list(_with_timeout(lambda: generate(batch), policy.timeout_s, what))
            if len(got) != len(batch):
                raise BackendError(f"{what}: the model returned {len(got)} generations for {len(batch)} requests")
        except RECOVERABLE as exc:
            for i in pending:
                attempts[i], errors[i] = attempt, f"{type(exc).__name__}: {exc}"
            cause = f"{type(exc).__name__}: {exc}"
        else:
            still = []
            for i, gen in zip(pending, got):
                attempts[i] = attempt
                if gen.text.strip():
                    generations[i], errors[i] = gen, ""
                else:
                    errors[i] = f"{EmptyGenerationError.__name__}: the model returned empty text"
                    still.append(i)
            pending = still
            cause = f"{len(still)} empty generation(s)"
        if not pending or attempt == policy.max_attempts:
            break
        wait = policy.backoff_s * 2 ** (attempt - 1)
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, cause, attempt, policy.max_attempts - 1, wait)
        time.sleep(wait)
    return [CallOutcome(g, e, a) for g, e, a in zip(generations, errors, attempts)]
