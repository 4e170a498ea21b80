"""Retries with backoff and a wall-clock timeout around one model call, so a flaky or hung expert costs a
bounded amount of time and ends as a recorded error instead of a stuck run.

Only backend *faults* are retried (`Fault`: an engine error, a timeout, out-of-memory, an empty answer), each
kind only where the request's policy lists it in `retry_on`; any other exception is a bug: it fails the call's
requests once, with the exception's type and message, and is logged with its traceback.

A timed-out attempt is cancelled (backends stop at their next decode step) and the call counts as running until
its thread really ends: the plan's next eviction of that model cannot free memory a hung call still holds.

An empty generation counts as a failed attempt: an empty answer quoted into a dependent's prompt, or
handed to the aggregator, would be a silent wrong answer. Only the requests that came back empty are asked
again (the rest of their batch keeps its answers); one still empty after every attempt fails alone."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, List, Optional, Sequence

from compllm.backends.base import BackendError, Generation, GenerationRequest

log = logging.getLogger(__name__)


class EmptyGenerationError(BackendError):
    """The model returned no text (only whitespace) for a request."""


class Fault(str, Enum):
    """Kinds of backend failure a retry policy may retry (member names are what a config lists)."""

    error = "error"  # the engine raised (BackendError)
    timeout = "timeout"  # an attempt ran past timeout_s
    oom = "oom"  # the device ran out of memory
    empty = "empty"  # the model answered with no text


def fault_of(exc: BaseException) -> Optional[Fault]:
    """The fault kind of an exception, or None for anything that is not a backend fault (a bug)."""
    if isinstance(exc, EmptyGenerationError):
        return Fault.empty
    if isinstance(exc, TimeoutError):
        return Fault.timeout
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return Fault.oom
    if isinstance(exc, BackendError):
        return Fault.error
    return None


@dataclass
class RetryPolicy:
    """Per model call: attempts (1 = no retry), exponential backoff, a wall-clock limit per attempt, and which
    faults are worth another attempt. The structured-config schema of `retry` and of `experts.<name>.retry`."""

    max_attempts: int = 2
    backoff_s: float = 0.5  # wait before attempt k+1 is backoff_s * 2**(k-1)
    timeout_s: Optional[float] = None  # per attempt; None = no limit
    retry_on: List[Fault] = field(default_factory=lambda: list(Fault))

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or (self.timeout_s is not None and self.timeout_s <= 0):
            raise ValueError("retry: max_attempts >= 1, backoff_s >= 0, timeout_s > 0 or null")
        self.retry_on = [Fault(f) for f in self.retry_on]


@dataclass(frozen=True)
class CallOutcome:
    """What one request of a (batched) call ended with: a generation, or the error of its last attempt."""

    generation: Generation | None
    error: str  # "" when `generation` is set
    attempts: int  # model calls this request took part in

    @property
    def ok(self) -> bool:
        return self.generation is not None


Generate = Callable[[list[GenerationRequest], threading.Event], Sequence[Generation]]


def call_with_timeout(generate: Generate, batch: list[GenerationRequest], timeout_s: float | None,
                      what: str) -> Sequence[Generation]:
    """One attempt. Past `timeout_s` the call is cancelled and awaited until its thread really ends (backends
    stop within one decode step), then TimeoutError: nothing keeps running behind the plan's back."""
    cancel = threading.Event()
    if timeout_s is None:
        return generate(batch, cancel)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = generate(batch, cancel)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"compllm-call-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        cancel.set()
        started = time.perf_counter()
        worker.join()  # the step stays running until the call has really stopped
        log.warning("%s took longer than %g s; cancelled (it stopped %.2f s later)", what, timeout_s,
                    time.perf_counter() - started)
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def generate_with_retry(generate: Generate, requests: Sequence[GenerationRequest],
                        policies: RetryPolicy | Sequence[RetryPolicy], what: str) -> list[CallOutcome]:
    """One outcome per request, never an exception. A failed call is retried for every request whose policy
    retries that fault and has attempts left; an empty generation is retried for its own request only.
    `policies`: one for every request, or one per request (experts may differ); the call's timeout is the
    longest of theirs, the backoff the shortest."""
    policies = [policies] * len(requests) if isinstance(policies, RetryPolicy) else list(policies)
    pending = list(range(len(requests)))
    generations: list[Generation | None] = [None] * len(requests)
    errors = [""] * len(requests)
    attempts = [0] * len(requests)
    timeout = None if any(p.timeout_s is None for p in policies) else max((p.timeout_s for p in policies),
                                                                         default=None)
    backoff = min((p.backoff_s for p in policies), default=0.0)
    attempt = 0
    while pending:
        attempt += 1
        batch = [requests[i] for i in pending]
        failed: list[tuple[int, Optional[Fault]]] = []
        try:
            got = list(call_with_timeout(generate, batch, timeout, what))
            if len(got) != len(batch):
                raise BackendError(f"{what}: the model returned {len(got)} generations for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - classified: faults may be retried, anything else fails once
            fault = fault_of(exc)
            if fault is None:
                log.exception("%s raised %s, which is not a backend fault (a bug?); its requests fail", what,
                              type(exc).__name__)
            for i in pending:
                attempts[i], errors[i] = attempt, f"{type(exc).__name__}: {exc}"
                failed.append((i, fault))
        else:
            for i, gen in zip(pending, got):
                attempts[i] = attempt
                if gen.text.strip():
                    generations[i], errors[i] = gen, ""
                else:
                    errors[i] = f"{EmptyGenerationError.__name__}: the model returned empty text"
                    failed.append((i, Fault.empty))
        pending = [i for i, fault in failed
                   if fault is not None and fault in policies[i].retry_on and attempt < policies[i].max_attempts]
        if pending:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: %d request(s) failed (%s); retry %d in %.1fs", what, len(pending), errors[pending[0]],
                        attempt, wait)
            time.sleep(wait)
    return [CallOutcome(g, e, a) for g, e, a in zip(generations, errors, attempts)]
