"""The running pipe behind the HTTP API: one `OnlinePipe` for the server's life, so requests that arrive while
others run are compiled into the same append-only plan and batched with the work already waiting.

Admission: at most `max_concurrent` requests in the pipe, `max_queue` more waiting, the rest refused (429).
Each admitted request gets a `Ticket`: an asyncio queue fed from the runtime's threads with its parts' results,
its final-answer text as it is written, and its end. A request that goes away or runs out of time cancels its
query's nodes that have not started.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from compllm.online import OnlinePipe
from compllm.runtime.result import NodeResult, QueryResult
from compllm.serve.config import ServeConfig
from compllm.serve.metrics import Metrics

log = logging.getLogger(__name__)
FINAL = "agg"  # the final-answer node of query q is `q:agg` (compiler.build.aggregate_node)


class QueueFull(Exception):
    """Every place in the pipe and in its queue is taken."""


@dataclass(frozen=True)
class Event:
    kind: str  # node (a part's node ended) | text (the final answer so far) | done (the final answer exists)
    node_id: str = ""
    result: NodeResult | None = None
    text: str = ""


@dataclass
class Ticket:
    """One admitted query's events, as they happen."""

    qid: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Slot:
    """A place in the pipe; released once, however the request ends."""

    def __init__(self, service: "Service"):
        self.service, self.released = service, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.service.in_flight -= 1
            self.service._places.release()


class Service:
    def __init__(self, pipeline: Any, config: ServeConfig):
        self.pipeline, self.config = pipeline, config
        self.pipe: OnlinePipe | None = None
        self.ready = threading.Event()
        self.draining = False
        self.failed: str | None = None  # why preparing the pipe failed
        self.in_flight = 0
        self.waiting = 0
        self.metrics = Metrics(lambda: self.waiting, lambda: self.in_flight,
                               lambda: self.pipe.increments if self.pipe else 0)
        self._places = asyncio.Semaphore(config.max_concurrent)
        self._threads = ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="compllm-ask")
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[asyncio.AbstractEventLoop, Ticket]] = {}

    # --- life -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Fit the router, build the cost model, load the planner's model: /healthz says 200 after this."""
        try:
            self.pipeline.prepare()
            self.pipeline.pool.get(self.pipeline.decomposer.model)
            self.pipe = OnlinePipe(self.pipeline, on_done=self._done, on_node=self._node, on_text=self._text)
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and every request, and logged
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("the pipe could not be prepared")
            return
        self.ready.set()
        log.info("pipe ready: %s", ", ".join(self.pipeline.model_aliases()))

    def close(self, timeout: float) -> bool:
        """Drain: every step already in the plan ends (within `timeout` s). False if it did not."""
        self._threads.shutdown(wait=False)
        if self.pipe is None:
            return True
        closer = threading.Thread(target=self.pipe.close, name="compllm-drain", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("the plan did not drain within %g s; exiting with steps still running", timeout)
        return not closer.is_alive()

    # --- admission ----------------------------------------------------------------------------------
    async def admit(self, timeout: float) -> Slot:
        """A place in the pipe, waiting in the queue for at most `timeout` s (asyncio.TimeoutError past it)."""
        if self.in_flight + self.waiting >= self.config.max_concurrent + self.config.max_queue:
            raise QueueFull()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._places.acquire(), timeout)
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return Slot(self)

    # --- queries ------------------------------------------------------------------------------------
    async def ask(self, text: str) -> Ticket:
        """Start answering `text` (the planner call runs in a worker thread); its events go to the ticket."""
        loop = asyncio.get_running_loop()
        (qid,) = await loop.run_in_executor(self._threads, self.pipe.ask, [text])
        ticket = Ticket(qid)
        with self._lock:  # what happened before now is replayed; what happens after is pushed
            self._tickets[qid] = (loop, ticket)
            for sq, _, res in self.pipe.parts(qid):
                if res is not None and res.status != "pending":
                    ticket.events.put_nowait(Event("node", f"{qid}:{sq.index}", res))
            if self.pipe.queries[qid].done.is_set():
                ticket.events.put_nowait(Event("done"))
        return ticket

    def forget(self, ticket: Ticket, cancel: bool) -> None:
        """The request has ended; `cancel`: its query's nodes that have not started are skipped."""
        with self._lock:
            self._tickets.pop(ticket.qid, None)
        if cancel and not self.pipe.queries[ticket.qid].done.is_set():
            self.pipe.cancel(ticket.qid)
            log.info("%s cancelled: its nodes that have not started are skipped", ticket.qid)

    async def result(self, qid: str) -> QueryResult:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.result, qid, 0)

    def parts(self, qid: str) -> list[dict[str, Any]]:
        """The query's parts so far, with their answers where they exist (progress, and a 504's partial answer)."""
        return [part_summary(sq.index, sq.text, expert, res) for sq, expert, res in self.pipe.parts(qid)]

    def usage(self, qid: str, result: QueryResult) -> tuple[int, int]:
        """(prompt, completion) tokens of the query's model calls: its planner row and its nodes (a node
        deduplicated onto another query's is that query's cost)."""
        gen = self.pipe.queries[qid].decomposition.generation
        prompt, output = (gen.prompt_tokens, gen.output_tokens) if gen is not None else (0, 0)
        own = [n for n in result.nodes if not n.note.startswith("deduplicated")]
        return prompt + sum(n.prompt_tokens for n in own), output + sum(n.output_tokens for n in own)

    def overlapping(self, qid: str) -> list[str]:
        """Other queries whose model calls ran while one of this query's did: batched with it in the plan or,
        across steps, by the model's engine."""
        records = [*self.pipe.records, *self.pipe.live.records]
        owners = [(r, {n.split(":", 1)[0] for n in r.nodes}) for r in records if r.kind in ("plan", "generate")]
        mine = [r for r, qids in owners if qid in qids]
        others = set()
        for r, qids in owners:
            if qids - {qid} and any(r.start < m.end and m.start < r.end for m in mine):
                others |= qids - {qid}
        return sorted(others, key=lambda q: int(q[1:]) if q[1:].isdigit() else 0)

    # --- from the runtime's threads -------------------------------------------------------------------
    def _push(self, qid: str, event: Event) -> None:
        with self._lock:
            entry = self._tickets.get(qid)
            if entry is not None:
                loop, ticket = entry
                loop.call_soon_threadsafe(ticket.events.put_nowait, event)

    def _node(self, nid: str, res: NodeResult) -> None:
        self.metrics.node_ended(res.expert, res.model, res.status, res.error, res.prompt_tokens, res.output_tokens)
        self._push(res.query_id, Event("node", nid, res))

    def _text(self, nid: str, text: str) -> None:
        qid = nid.split(":", 1)[0]
        if nid == f"{qid}:{FINAL}":
            self._push(qid, Event("text", nid, text=text))

    def _done(self, qid: str) -> None:
        self._push(qid, Event("done"))


def part_summary(index: int, question: str, expert: str, res: NodeResult | None) -> dict[str, Any]:
    status = "pending" if res is None else res.status
    return {"index": index, "question": question, "expert": expert, "status": status,
            "answer": res.answer if res is not None and res.ok else None,
            "error": res.error if res is not None and res.error else None,
            "batch_size": res.batch_size if res is not None else 0}
