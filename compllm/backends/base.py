"""The one interface every engine implements: a batch of chat requests in, texts and token counts out."""
from __future__ import annotations

import math
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
    # can constrain decoding to it do (hf: xgrammar where installed; llamacpp: a GBNF grammar; openai:
    # response_format json_schema where the server accepts it) and say so in `Generation.constrained`; the others
    # decode freely and the caller's parser has to cope (the decomposer records which happened).
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
    # How sure the model was of this answer, in [0, 1] (None: the engine cannot tell). A `choices` answer: the
    # probability margin of the best option letter over the runner-up at the first answer token (the letters'
    # probabilities renormalised among themselves, in `choice_probs`, aligned with `request.choices`). Text:
    # exp(mean token log-prob) of the greedy answer (see `text_confidence`). A cascade's guard reads it.
    confidence: Optional[float] = None
    choice_probs: tuple[float, ...] = ()


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


def choice_confidence(logits: Sequence[float]) -> tuple[float, tuple[float, ...]]:
    """(margin, probabilities) of option letters from their first-token logits: softmax over the letters only
    (the mass the model puts elsewhere says nothing about which letter it prefers), then best minus runner-up.
    A margin near 0 is a coin toss between two letters; near 1, one letter takes all the mass."""
    if not logits:
        return 0.0, ()
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    probs = tuple(w / total for w in weights)
    ranked = sorted(probs, reverse=True)
    return ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0), probs


def text_confidence(token_logprobs: Sequence[float]) -> Optional[float]:
    """exp(mean log-prob) of the answer's tokens: the geometric-mean probability of a greedy token. Chosen because
    it is length-normalised (a long answer is not less sure per token), is what every engine can report (token
    log-probs: hf and llama.cpp from logits, OpenAI servers with `logprobs`), and lies in [0, 1] like the choice
    margin, so one threshold knob reads both. None for an empty answer."""
    if not token_logprobs:
        return None
    return math.exp(sum(token_logprobs) / len(token_logprobs))
