"""The HTTP API (FastAPI): POST /v1/chat/completions (JSON or SSE), GET /v1/models, /healthz and /metrics.

Every error is an OpenAI-style body whose message says what to change; an exception in one request is that
request's 500 and nothing else's.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from compllm.serve import schemas
from compllm.serve.errors import APIError, bad_request, validation_error
from compllm.runtime.result import QueryResult
from compllm.serve.service import FINAL, Event, QueueFull, Service, Ticket

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting request checks its client is still there
CLIENT_GONE = 499  # status recorded (never sent) for a request whose client disconnected


class Deadline(Exception):
    """The request's request_timeout_s has passed."""


class Disconnected(Exception):
    """The client went away."""


def create_app(service: Service) -> FastAPI:
    config = service.config
    api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.prepare, name="compllm-prepare", daemon=True).start()
        yield

    app = FastAPI(title="compllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, service=service)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        hint = {404: f"no such endpoint {request.method} {request.url.path}: compllm serves POST /v1/chat/completions, "
                     "GET /v1/models, /healthz and /metrics",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(APIError(exc.status_code, hint, code=str(exc.status_code)).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(exc).__name__}: {exc}); other requests are "
                                          "unaffected; the server log has the traceback", "server_error",
                                     code="internal_error").body(), 500)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if service.failed:
            return JSONResponse({"status": "failed", "error": service.failed}, 503)
        if service.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not service.ready.is_set():
            return JSONResponse({"status": "starting"}, 503)
        return JSONResponse({"status": "ok", "model": config.model_name})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request, api_key)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": started, "owned_by": "compllm"}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        authorize(request, api_key)
        req = parse(await read_body(request, config.max_body_bytes))
        if req.model != config.model_name:
            raise APIError(404, f"model {req.model!r} does not exist here; this server serves {config.model_name!r} "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")
        text, ignored = req.query()
        check_open(service)
        try:
            slot = await service.admit(config.request_timeout_s)
        except QueueFull:
            raise APIError(429, f"the server is at capacity ({config.max_concurrent} requests running, "
                                f"{config.max_queue} waiting): retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise deadline_error(config.request_timeout_s, "", []) from None
        deadline = arrived + config.request_timeout_s
        if req.stream:
            return StreamingResponse(stream(service, req, text, ignored, slot, deadline, arrived),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await complete(service, request, text, ignored, deadline)
        finally:
            slot.release()

    started = int(time.time())
    return app


# --------------------------------------------------------------------------- request checks


def authorize(request: Request, api_key: str) -> None:
    """With a key configured, `Authorization: Bearer <key>` is required; without one, any key is accepted."""
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' (the key is the value "
                            "of the server's api key environment variable)", "authentication_error",
                       code="invalid_api_key")
    if given.strip() != api_key:
        raise APIError(401, "wrong API key: use the value of the server's api key environment variable",
                       "authentication_error", code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes (what is sent beyond it is read and dropped, up to 4x the limit,
    so the client gets the 413 instead of a broken connection)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"request body larger than serve.max_body_bytes={limit}: send a shorter conversation",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > 4 * limit:
            break
    if len(body) > limit:
        raise too_large
    return bytes(body)


def parse(body: bytes) -> schemas.ChatRequest:
    if not body.strip():
        raise bad_request('empty body: send a JSON object such as {"model": ..., "messages": [{"role": "user", '
                          '"content": "your question"}]}', code="missing_required_parameter")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body is a JSON {type(data).__name__}, not an object with 'model' and 'messages'",
                          code="invalid_json")
    try:
        return schemas.ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(), schemas.FIELDS) from None


def check_open(service: Service) -> None:
    if service.draining:
        raise APIError(503, "the server is shutting down: send the request to another instance", "server_error",
                       code="shutting_down")
    if service.failed:
        raise APIError(503, f"the pipe could not be prepared ({service.failed}); see the server log",
                       "server_error", code="not_ready")
    if not service.ready.is_set():
        raise APIError(503, "the pipe is still loading its models: retry when GET /healthz answers 200",
                       "server_error", code="not_ready", headers={"Retry-After": "2"})


def deadline_error(timeout: float, answer: str, parts: list[dict[str, Any]]) -> APIError:
    answered = sum(p["answer"] is not None for p in parts)
    return APIError(504, f"no final answer within serve.request_timeout_s={timeout:g} s; 'partial_answer' has "
                         f"the {answered} of {len(parts)} parts answered by then (partial: true)", "timeout_error",
                    code="deadline_exceeded", extra={"partial": True, "partial_answer": answer,
                                                     "compllm": {"parts": parts}})


def partial_answer(parts: list[dict[str, Any]]) -> str:
    """What a query that ran out of time has: each answered part as `question answer`, one per line."""
    return "\n".join(f"{p['question']} {p['answer']}" for p in parts if p["answer"] is not None)


# --------------------------------------------------------------------------- answering


async def until(awaitable: "asyncio.Future", deadline: float, request: Optional[Request]) -> Any:
    """The awaitable's result, unless the deadline passes (Deadline) or the client goes away (Disconnected);
    the awaitable is left running then (a planner call in flight still yields the id to cancel)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise Deadline()
        done, _ = await asyncio.wait({awaitable}, timeout=min(POLL_S, left))
        if done:
            return awaitable.result()
        if request is not None and await request.is_disconnected():
            raise Disconnected()


async def next_event(ticket: Ticket, deadline: float, request: Optional[Request]) -> Event:
    getting = asyncio.ensure_future(ticket.events.get())
    try:
        return await until(getting, deadline, request)
    finally:
        getting.cancel()


def cancel_when_asked(service: Service, asking: "asyncio.Future") -> None:
    """The request ended before its planner call did: cancel the query once it has an id."""
    def cancel(task: "asyncio.Future") -> None:
        if not task.cancelled() and task.exception() is None:
            service.forget(task.result(), cancel=True)
    asking.add_done_callback(cancel)


async def answered(service: Service, ticket: Ticket, deadline: float, request: Optional[Request]) -> QueryResult:
    """Wait for the query's final answer."""
    while (await next_event(ticket, deadline, request)).kind != "done":
        pass
    return await service.result(ticket.qid)


def extension(service: Service, ticket: Ticket, result: QueryResult, ignored: int) -> dict[str, Any]:
    """What the pipe did for this request: its parts and who answered them, and which other requests it ran with."""
    return {"query_id": ticket.qid, "partial": result.partial, "unanswered": result.unanswered,
            "ignored_messages": ignored, "parts": service.parts(ticket.qid),
            "plan_increments": service.pipe.increments, "overlapping_queries": service.overlapping(ticket.qid)}


def finish_reason(result: QueryResult) -> str:
    sink = next((n for n in result.nodes if n.node_id == f"{result.id}:{FINAL}"), None)
    return "length" if sink is not None and sink.finish_reason == "length" else "stop"


async def complete(service: Service, request: Request, text: str, ignored: int, deadline: float) -> Response:
    model = service.config.model_name
    asking = asyncio.ensure_future(service.ask(text))
    try:
        ticket = await until(asking, deadline, request)
    except Deadline:
        cancel_when_asked(service, asking)
        raise deadline_error(service.config.request_timeout_s, "", []) from None
    except Disconnected:
        cancel_when_asked(service, asking)
        return Response(status_code=CLIENT_GONE)
    finished = False
    try:
        result = await answered(service, ticket, deadline, request)
        finished = True
    except Deadline:
        parts = service.parts(ticket.qid)
        raise deadline_error(service.config.request_timeout_s, partial_answer(parts), parts) from None
    except Disconnected:
        return Response(status_code=CLIENT_GONE)
    finally:
        service.forget(ticket, cancel=not finished)
    body = schemas.completion(schemas.completion_id(), model, result.final_answer, finish_reason(result),
                              service.usage(ticket.qid, result), extension(service, ticket, result, ignored))
    return JSONResponse(body)


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream(service: Service, req: schemas.ChatRequest, text: str, ignored: int, slot, deadline: float,
                 arrived: float) -> AsyncIterator[bytes]:
    """SSE chunks: the role, the final answer as it is written (a model-written final answer streams token by
    token; a joined one comes whole once its parts are done), the finish reason, [DONE]. With
    `compllm_progress`, chunks without choices carry each part's progress in a `compllm` field."""
    cid, created, model = schemas.completion_id(), int(time.time()), service.config.model_name
    sent = ""
    asking = asyncio.ensure_future(service.ask(text))
    ticket: Optional[Ticket] = None
    finished = False

    def content(delta: str) -> bytes:
        nonlocal sent
        if not sent:
            service.metrics.first_token.observe(time.perf_counter() - arrived)
        sent += delta
        return sse(schemas.chunk(cid, model, created, {"content": delta}))

    try:
        yield sse(schemas.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        ticket = await until(asking, deadline, None)
        seen: set[int] = set()

        def progress() -> Iterator[bytes]:
            """A chunk for each part that has ended since the last call (in part order)."""
            for part in service.parts(ticket.qid):
                if part["status"] != "pending" and part["index"] not in seen:
                    seen.add(part["index"])
                    yield sse(schemas.chunk(cid, model, created, compllm={"event": "part", **part}))

        while (event := await next_event(ticket, deadline, None)).kind != "done":
            if event.kind == "text":
                written = event.text.lstrip()
                if written.startswith(sent) and len(written) > len(sent):
                    yield content(written[len(sent):])
            elif event.kind == "node" and req.compllm_progress:
                for item in progress():
                    yield item
        if req.compllm_progress:  # parts answered by another query's identical node send no event of their own
            for item in progress():
                yield item
        result = await service.result(ticket.qid)
        finished = True
        final = result.final_answer
        if final.startswith(sent):
            if final[len(sent):]:
                yield content(final[len(sent):])
        else:  # a retried or cut reply: what was sent cannot be taken back
            log.warning("%s: the streamed text is not a prefix of the final answer", ticket.qid)
        ext = {"compllm": {"event": "done", **extension(service, ticket, result, ignored)}} \
            if req.compllm_progress else {}
        yield sse(schemas.chunk(cid, model, created, {}, finish_reason(result), **ext))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(schemas.chunk(cid, model, created, usage=schemas.usage(*service.usage(ticket.qid, result))))
        yield b"data: [DONE]\n\n"
    except Deadline:
        parts = service.parts(ticket.qid) if ticket is not None else []
        yield sse(deadline_error(service.config.request_timeout_s, partial_answer(parts), parts).body())
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - the status is sent already: the error is the stream's last event
        log.exception("streamed request %s failed", ticket.qid if ticket else "(not asked yet)")
        yield sse(APIError(500, f"internal error ({type(exc).__name__}: {exc}); other requests are unaffected",
                           "server_error", code="internal_error").body())
        yield b"data: [DONE]\n\n"
    finally:
        slot.release()
        if ticket is not None:
            service.forget(ticket, cancel=not finished)
        elif not asking.done():
            cancel_when_asked(service, asking)


class MetricsMiddleware:
    """Counts every response by endpoint and status, and times chat completions to their last byte."""

    PATHS = ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics")

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), CLIENT_GONE
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics = self.service.metrics
            metrics.requests.inc(path=path, code=str(status))
            if path == "/v1/chat/completions":
                metrics.latency.observe(time.perf_counter() - start, code=str(status))
