"""`openai` backend: an expert's model served by any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
llama-server, Ollama, a hosted API), driven with the official `openai` client.

A plan step's rows become concurrent requests, at most the step's slots (and the server's `max_concurrency`) in
flight at once, so the compiler's batching means on a server what it means in process: how many sequences the
engine decodes together (the server's continuous batching merges them). Requests are greedy (`temperature=0`).
A `choice` request is answered from the first token's `top_logprobs` over the option letters when the server
returns log-probabilities, else by a one-token request whose letter is read back, never by a long free-text
decode. Token counts come from `usage`. Every transport problem is a `BackendError` (retried under the expert's
retry policy as an `error` fault); a refused connection names the alias and the URL; a reply without text or with
malformed JSON is a failed attempt, never a crash. The client's own retries are off: compllm's policy decides.
"""
from __future__ import annotations

import asyncio
import json
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import MISSING

from compllm.backends.base import (BackendError, choice_confidence, text_confidence, Generation, GenerationCancelled, GenerationRequest, ModelStats,
                                   OnText)

log = logging.getLogger(__name__)
TOP_LOGPROBS = 20  # the most every server here returns per token (vLLM's default --max-logprobs)


@dataclass
class ServerConfig:
    """Where a model is served and what that server supports (`models.<alias>.server`)."""

    base_url: str = MISSING  # e.g. http://127.0.0.1:8000/v1
    model: str = MISSING  # the served model's name (what GET /v1/models lists)
    api_key_env: Optional[str] = None  # environment variable holding the API key; None: no key ("none" is sent)
    max_concurrency: int = 8  # requests in flight at once, whatever the step's slots
    timeout_s: float = 300.0  # one request, connect to last byte
    logprobs: bool = True  # returns top_logprobs: `choice` nodes are scored from the first token
    json_schema: bool = False  # accepts response_format={"type": "json_schema", ...}
    prefix_cache: bool = True  # reuses the KV of a prompt prefix it has seen (vLLM APC, SGLang radix, llama.cpp)


class OpenAIServerModel:
    """One served model. Thread-safe: calls from several plan streams share one event loop and connection pool."""

    def __init__(self, name: str, server: ServerConfig, alias: str = ""):
        from openai import AsyncOpenAI

        self.name, self.server, self.alias = name, server, alias or name
        self.stats = ModelStats()
        key = os.environ.get(server.api_key_env, "") if server.api_key_env else "none"
        if server.api_key_env and not key:
            raise BackendError(f"model {self.alias!r}: the API key variable {server.api_key_env} is not set; "
                               f"export it, or set models.{self.alias}.server.api_key_env=null for a server without one")
        self.in_flight = 0
        self.peak_in_flight = 0  # the most requests this client had at the server at once (tests, traces)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"compllm-openai-{self.alias}",
                                        daemon=True)
        self._thread.start()
        self._client = AsyncOpenAI(base_url=server.base_url, api_key=key or "none", timeout=server.timeout_s,
                                   max_retries=0)
        start = time.perf_counter()
        self._probe()
        self.stats.load_seconds = time.perf_counter() - start

    def _probe(self) -> None:
        """Fail at load time, with the URL, when nothing answers there or the served model is not listed."""
        async def listed() -> list[str]:
            page = await self._client.models.list()
            return [m.id for m in page.data]

        try:
            names = self._run(listed(), None)
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            raise self._fault(exc) from exc
        if names and self.server.model not in names:
            log.warning("model %r: %s serves %s, not %r; requests will name %r anyway", self.alias,
                        self.server.base_url, names, self.server.model, self.server.model)

    def close(self) -> None:
        async def close() -> None:
            await self._client.close()

        self._run(close(), None)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None,
                 cancel: threading.Event | None = None, on_text: OnText | None = None) -> list[Generation]:
        """`on_text`: the replies are streamed (`stream: true`) and each row's text so far is handed over."""
        if not requests:
            return []
        slots = min(max_live_rows or len(requests), self.server.max_concurrency)
        start = time.perf_counter()
        results = self._run(self._batch(list(requests), slots, on_text), cancel)
        seconds = time.perf_counter() - start
        out = [Generation(text, p, o, seconds, finish, len(requests), constrained=self._constrains(r),
                          confidence=conf, choice_probs=probs)
               for r, (text, p, o, finish, conf, probs) in zip(requests, results)]
        self.stats.calls += 1
        self.stats.prompt_tokens += sum(g.prompt_tokens for g in out)
        self.stats.output_tokens += sum(g.output_tokens for g in out)
        self.stats.generate_seconds += seconds
        return out

    # --- the event loop side -------------------------------------------------------------------
    def _run(self, coro, cancel: threading.Event | None):
        """Run `coro` on this model's loop; a set `cancel` cancels it (its requests are aborted)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        while not future.done():
            if cancel is not None and cancel.is_set():
                future.cancel()
                break
            concurrent.futures.wait([future], timeout=0.05)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise GenerationCancelled(f"model {self.alias!r}: call cancelled") from None

    async def _batch(self, requests: list[GenerationRequest], slots: int,
                     on_text: OnText | None) -> list[tuple]:
        gate = asyncio.Semaphore(slots)

        async def one(i: int, request: GenerationRequest):
            async with gate:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    if on_text is not None and not request.choices:
                        return await self._streamed(request, lambda text: on_text(i, text))
                    return await self._one(request)
                finally:
                    self.in_flight -= 1

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def _constrains(self, request: GenerationRequest) -> bool:
        """The request's json_schema goes to the server as response_format (only where server.json_schema says the
        server enforces it; elsewhere the reply is free text and the caller's parser copes)."""
        return bool(request.json_schema and self.server.json_schema and not request.choices)

    def _kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.server.model, "messages": list(request.messages), "temperature": 0.0,
                                  "max_tokens": request.max_new_tokens}
        if self._constrains(request):
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "plan", "strict": True,
                                                         "schema": json.loads(request.json_schema)}}
        if request.stop:
            kwargs["stop"] = list(request.stop)[:4]  # the OpenAI API takes at most 4 stop strings
        if self.server.logprobs:  # the answer tokens' log-probs: the answer's confidence (a cascade reads it)
            kwargs["logprobs"] = True
        return kwargs

    async def _streamed(self, request: GenerationRequest, on_text) -> tuple:
        """A streamed reply: the text so far after every chunk; token counts from the final usage chunk, if any."""
        text, finish, prompt, output = "", "stop", 0, 0
        logprobs: list[float] = []
        try:
            stream = await self._client.chat.completions.create(**self._kwargs(request), stream=True,
                                                                 stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    prompt, output = int(chunk.usage.prompt_tokens or 0), int(chunk.usage.completion_tokens or 0)
                for choice in chunk.choices or ():
                    if choice.delta is not None and choice.delta.content:
                        text += choice.delta.content
                        on_text(text)
                    logprobs += _token_logprobs(choice)
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
        except Exception as exc:  # noqa: BLE001 - classified into a backend fault with the alias and URL
            raise self._fault(exc) from exc
        return text.strip(), prompt, output, finish, text_confidence(logprobs), ()

    async def _one(self, request: GenerationRequest) -> tuple:
        kwargs = self._kwargs(request)
        if request.choices:
            kwargs.pop("stop", None)
            kwargs["max_tokens"] = 1
            if self.server.logprobs:
                kwargs.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        try:
            response = await self._client.chat.completions.create(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified into a backend fault with the alias and URL
            raise self._fault(exc) from exc
        choice = _first_choice(response, f"model {self.alias!r} at {self.server.base_url}")
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        output = int(getattr(usage, "completion_tokens", 0) or 0)
        if request.choices:
            letter, confidence, probs = self._letter(choice, request.choices)
            return letter, prompt, 1, "stop", confidence, probs
        text = (choice.message.content or "") if choice.message is not None else ""
        return (text.strip(), prompt, output, "length" if choice.finish_reason == "length" else "stop",
                text_confidence(_token_logprobs(choice)), ())

    def _letter(self, choice: Any, options: Sequence[str]) -> tuple[str, float | None, tuple[float, ...]]:
        """The option letter the model ranks highest at its first answer token, with the letters' margin and
        probabilities (a letter outside the server's top log-probs counts as probability 0); from the text
        alone (no log-probs) the confidence is unknown (None)."""
        content = getattr(getattr(choice, "logprobs", None), "content", None) or []
        if content:
            scores = {}
            for alt in content[0].top_logprobs or []:
                letter = alt.token.strip()
                if letter in options and letter not in scores:
                    scores[letter] = alt.logprob
            if scores:
                margin, probs = choice_confidence([scores.get(o, -1e9) for o in options])
                return max(scores, key=scores.get), margin, probs
        said = ((choice.message.content or "") if choice.message is not None else "").strip()[:1]
        if said in options:
            return said, None, ()
        raise BackendError(f"model {self.alias!r} at {self.server.base_url}: no option letter ({', '.join(options)}) among the first token's "
                           f"{'top log-probabilities' if content else 'text'} ({said!r})")

    def _fault(self, exc: Exception) -> Exception:
        """A transport or protocol failure as a backend fault naming the alias and URL (timeouts as TimeoutError)."""
        import openai

        where = f"model {self.alias!r} at {self.server.base_url}"
        if isinstance(exc, openai.APITimeoutError):
            return TimeoutError(f"{where}: no answer within {self.server.timeout_s:g} s")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return BackendError(f"{where}: cannot connect ({type(cause).__name__}: {cause}); is the server running?")
        if isinstance(exc, openai.APIStatusError):
            body = str(getattr(exc, "message", exc))[:200]
            return BackendError(f"{where}: HTTP {exc.status_code}: {body}")
        if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
            return BackendError(f"{where}: malformed response ({type(exc).__name__}: {str(exc)[:200]})")
        return BackendError(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")


def _token_logprobs(choice: Any) -> list[float]:
    """The log-probs of a reply's (or a streamed chunk's) tokens, when the server returned them."""
    content = getattr(getattr(choice, "logprobs", None), "content", None) or []
    return [float(t.logprob) for t in content if getattr(t, "logprob", None) is not None]


def _first_choice(response: Any, where: str) -> Any:
    choices = getattr(response, "choices", None)
    if not choices:
        raise BackendError(f"{where}: the server returned no choices")
    return choices[0]
