"""The one interface every engine implements: a batch of chat requests in, texts and token counts out."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

#: Streaming reader of a call: (request index, its text so far), called as each row's text grows.
OnText = Callable[[int, str], None]


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[dict[str, str], ...]  # chat messages: {"role": ..., "content": ...}
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    # Non-empty: the answer is exactly one of these (option letters); backends that can score tokens pick the
    # most likely one at the first answer token instead of decoding (others may generate and ignore it).
    choices: tuple[str, ...] = ()
    # Non-empty: a JSON Schema (as JSON text, so the request stays hashable) the answer must satisfy. Backends that
    # can constrain decoding to it do (llamacpp: a GBNF grammar; openai: response_format json_schema where the
    # server accepts it) and say so in `Generation.constrained`; the others decode freely and the caller's parser
    # has to cope (the decomposer records which happened).
    json_schema: str = ""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int
    seconds: float  # wall time of the batched call this generation was part of
    finish_reason: str = "stop"  # stop | length
    batch_size: int = 1
    cached_tokens: int = 0  # prompt tokens not computed for this call: their KV came from a cached shared prefix
    constrained: bool = False  # the request's json_schema was enforced while decoding (not merely asked for)


@dataclass
class ModelStats:
    """Running totals a backend keeps so results can report load time and token counts."""

    load_seconds: float = 0.0
    calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    generate_seconds: float = 0.0
    # Where the time went, for backends that can tell (hf, llamacpp; 0 elsewhere): prompt prefill (prompt tokens
    # computed, reused prefix tokens excluded) and decode steps (one token fed per live row per step).
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    """One loaded model. `generate` is greedy and deterministic for a given batch.

    `max_live_rows` (a plan step's slots; None: all at once): at most that many rows decode at once, the
    others join as rows finish. Backends without continuous refill may ignore it: it changes speed and
    memory, never answers. `cancel`: once set, stop soon (within a decode step) by raising
    `GenerationCancelled`: a timed-out call must really end before its step may count as done. `on_text`:
    called with (request index, text so far) as a row's text grows (backends that cannot stream call it once,
    at the end)."""

    name: str
    stats: ModelStats

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None,
                 cancel: Optional[threading.Event] = None, on_text: Optional[OnText] = None) -> list[Generation]: ...


class BackendError(RuntimeError):
    """A model could not be loaded or could not generate; the message says which and why."""


class GenerationCancelled(BackendError):
    """The call was cancelled (its attempt timed out) and stopped early."""


class BackendOutOfMemory(BackendError, MemoryError):
    """The device ran out of memory during a call (retried as the `oom` fault)."""
