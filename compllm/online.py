"""The pipe run online: the planner is read while it writes, and every complete part is routed and compiled into
the running plan at once, so experts start on part 1 while the planner still writes part 3; whole queries join
the same plan as they arrive (the server's requests), batched with the work already waiting.

One `OnlineCompiler` (append-only plan increments, verified after each) and one `LiveRun` (the executor fed
those increments) per pipe; the runtime never re-plans. Numbered questions need no planner call and start at
once. A query's final-answer node is compiled when its decomposition is complete.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from compiler.build import (BuildLimits, RoutedSubQuery, aggregate_node, check_subquery, node_id,
                            subquery_nodes)
from compiler.ir import AGGREGATOR, Graph, Query
from compiler.online import OnlineCompiler
from compllm.frontend.decomposer import Decomposition
from compllm.frontend.parse import SubQuery
from compllm.frontend.router import Route
from compllm.frontend.streaming import StreamingReader
from compllm.runtime.result import NodeResult, QueryResult, query_result
from compllm.runtime.trace import Mark, StepRecord

log = logging.getLogger(__name__)


CHARS_PER_TOKEN = 3  # a low estimate of characters per token (English, code): more tokens, more bytes reserved


def planner_overlap_bytes(pipeline: Any) -> int:
    """Bytes the online plan reserves for the planner writing beside it.

    On the hf engine the planner's row decodes in one batch with the plan's rows (cross-call batching), and a
    merged batch pads every row's KV to the longest row: the planner's prompt and answer. Measured on SmolLM2-135M
    (bf16, one compound query): the run's peak rose 131 MiB above the loaded model streamed, 34 MiB not streamed.
    So every step of an online plan is planned with that padded KV beside it: the planner's length x (its row +
    a full step's rows). Other engines keep each sequence's KV apart (llama.cpp) or elsewhere (servers): 0."""
    model = pipeline.decomposer.model
    if model not in pipeline.cost.models or str(pipeline.pool.spec(model).get("backend", "hf")) != "hf":
        return 0
    request = pipeline.decomposer.request("?")
    length = sum(len(m["content"]) for m in request.messages) // CHARS_PER_TOKEN + request.max_new_tokens
    rows = 1 + pipeline.compiler_config.max_batch_size
    return pipeline.cost.batch_kv_bytes(model, [(length, 0)] * rows)


@dataclass
class _Query:
    id: str
    text: str
    parts: dict[int, tuple[SubQuery, Route]] = field(default_factory=dict)  # admitted parts
    decomposition: Decomposition | None = None
    nodes: list[str] = field(default_factory=list)  # its nodes in the original graph
    done: threading.Event = field(default_factory=threading.Event)


class OnlinePipe:
    """A running composed team: `ask` queries (from any thread), `result` their answers, `close` to drain."""

    def __init__(self, pipeline: Any, progress: Any = None, on_done: Callable[[str], None] | None = None,
                 on_node: Callable[[str, NodeResult], None] | None = None,
                 on_text: Callable[[str, str], None] | None = None):
        """`on_done(query id)` once a query's final answer exists; `on_node(node id, result)` as each node ends;
        `on_text(node id, text so far)` as a final-answer node's reply is written (all from runtime threads)."""
        pipeline.prepare()
        self.p = pipeline
        self.ctx = pipeline.context()
        self.on_done, self.on_node = on_done, on_node
        cost = dataclasses.replace(pipeline.cost, base_bytes=pipeline.cost.base_bytes + planner_overlap_bytes(pipeline))
        self.compiler = OnlineCompiler(cost, pipeline.compiler_config,
                                       resident={m: 0 for m in pipeline.pool.loaded()})
        self.original = Graph()  # as built from the planner's parts, before passes: results name these nodes
        self.queries: dict[str, _Query] = {}
        self.records: list[StepRecord] = []  # the planner calls
        self.marks: list[Mark] = []  # when each part was parsed
        self.compile_seconds = 0.0
        self.route_seconds = 0.0
        self.increments = 0  # plan increments submitted to the running plan
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._limits = BuildLimits(pipeline.decomposer.max_subqueries,
                                   max(pipeline.decomposer.max_chars, pipeline.decomposer.max_query_chars))
        self._parts: queue.Queue = queue.Queue()  # (query id, part) from the planner's stream, admitted in order
        self._admitter = threading.Thread(target=self._admit_loop, name="compllm-admit", daemon=True)
        self._admitter.start()
        self.live = pipeline.policy.start(self.ctx, progress, on_answer=self._answered, on_text=on_text)
        self.live.on_step = self._on_step

    # --- asking -------------------------------------------------------------------------------------
    def ask(self, texts: Sequence[str], stream: bool | None = None) -> list[str]:
        """Start answering `texts` (one planner call for all of them); returns their query ids at once after
        the planner call. Parts are compiled into the running plan as the planner writes them (`stream`; None:
        `decomposer.stream`), else when its answer is complete."""
        d = self.p.decomposer
        stream = d.stream if stream is None else stream
        ids = [f"q{next(self._ids)}" for _ in texts]
        for qid, text in zip(ids, texts):
            self.queries[qid] = _Query(qid, text)
        rest = []
        for qid, text in zip(ids, texts):
            numbered = d.enumerated(text)
            if numbered is not None:
                self._complete(qid, numbered)
            else:
                rest.append((qid, text))
        if rest:
            self._plan(rest, stream)
        return ids

    def result(self, qid: str, timeout: float | None = None) -> QueryResult | None:
        """The query's result once its final answer exists (None on timeout)."""
        if not self.queries[qid].done.wait(timeout):
            return None
        return self._query_result(qid)

    def cancel(self, qid: str) -> None:
        """The asker went away: the query's nodes that have not started are skipped (started steps finish)."""
        self.live.cancel(qid)

    def parts(self, qid: str) -> list[tuple[SubQuery, str, NodeResult | None]]:
        """The query's admitted parts so far: (part, expert, its result once its node has ended)."""
        q = self.queries[qid]
        out = []
        with self.live.lock:
            for index, (sq, route) in sorted(q.parts.items()):
                nid = node_id(qid, index)
                out.append((sq, route.expert, self.live.results.get(self.live.aliases.get(nid, nid))))
        return out

    def close(self) -> None:
        """No more queries: wait for every step to finish."""
        self._parts.join()
        with self._lock:
            self._compile(force=True)
        self.live.close()
        self.live.join()

    # --- the planner, streamed ------------------------------------------------------------------------
    def _plan(self, queries: list[tuple[str, str]], stream: bool) -> None:
        d, model = self.p.decomposer, self.p.decomposer.model
        readers = {i: StreamingReader(d, text, lambda sq, qid=qid: self._parts.put((qid, sq)))
                   for i, (qid, text) in enumerate(queries)}
        self.p.pool.get(model)  # the planner's model: loaded on demand, before the plan uses it
        start = self.ctx.now()
        outcomes = self.ctx.generate(model, [d.request(text) for _, text in queries], [self.p.retry] * len(queries),
                                     "plan", on_text=(lambda row, text: readers[row].feed(text)) if stream else None)
        self.records.append(StepRecord("plan", "plan", model, -1, start, self.ctx.now(), tuple(q for q, _ in queries)))
        for i, ((qid, text), outcome) in enumerate(zip(queries, outcomes)):
            for sq, at in zip(readers[i].parts, readers[i].parsed_at):
                self.marks.append(Mark(f"parsed {qid}:{sq.index}", -1, at - self.ctx.t0))
            if outcome.generation is None:
                decomposition = d.single(text, reason=f"decomposer call failed: {outcome.error}")
                if readers[i].parts:  # parts already running stay: they are the decomposition
                    decomposition = Decomposition(text, tuple(readers[i].parts), False,
                                                  warnings=(f"the planner call failed after {len(readers[i].parts)} "
                                                            f"parts: {outcome.error}",), format="json")
            else:
                decomposition = readers[i].finish(outcome.generation.text, outcome.generation)
            self._parts.put((qid, decomposition))

    # --- admission: parts and queries into the plan ---------------------------------------------------
    def _admit_loop(self) -> None:
        while True:
            qid, item = self._parts.get()
            try:
                if isinstance(item, Decomposition):
                    self._complete(qid, item)
                else:
                    self._admit(qid, [item])
            except Exception:  # noqa: BLE001 - a part that cannot be admitted must not stop the others
                log.exception("could not admit %s into the running plan", qid)
            finally:
                self._parts.task_done()

    def _admit(self, qid: str, parts: list[SubQuery]) -> None:
        """Route and compile parts of a query still being planned; they start as soon as their inputs exist."""
        q = self.queries[qid]
        start = time.perf_counter()
        routes = self.p.router.route([sq.text for sq in parts])
        self.route_seconds += time.perf_counter() - start
        nodes = []
        for sq, route in zip(parts, routes):
            rsq = self._routed(sq, route)
            check_subquery(qid, rsq, set(q.parts), self._limits)
            q.parts[sq.index] = (sq, route)
            nodes.extend(subquery_nodes(qid, rsq, self.p.retrievals()))
        with self._lock:
            for node in nodes:
                self.original.add(node)
                q.nodes.append(node.id)
            self.compiler.add(nodes)
            self._compile()

    def _complete(self, qid: str, decomposition: Decomposition) -> None:
        """The rest of the query's parts and its final-answer node."""
        q = self.queries[qid]
        missing = [sq for sq in decomposition.subqueries if sq.index not in q.parts]
        if missing:
            self._admit(qid, missing)
        q.decomposition = decomposition
        routed = [self._routed(sq, route) for sq, route in (q.parts[sq.index] for sq in decomposition.subqueries)]
        sink = aggregate_node(qid, decomposition.query, routed, AGGREGATOR, self.p.aggregator.max_new_tokens,
                              self.p.final_answer(decomposition))
        with self._lock:
            self.original.add(sink)
            q.nodes.append(sink.id)
            self.original.add_query(Query(qid, decomposition.query, sink.id))
            self.compiler.add([sink], [Query(qid, decomposition.query, sink.id)])
            self._compile()

    def _routed(self, sq: SubQuery, route: Route) -> RoutedSubQuery:
        return RoutedSubQuery(sq.index, sq.text, sq.depends_on, route.expert, sq.answer_type, route.score,
                              route.routed_by, self.p.experts[route.expert].max_new_tokens)

    def _compile(self, force: bool = False) -> None:
        """Compile what was admitted into the next plan increment, unless the streams still have steps waiting
        (then the arrivals wait and are batched together: they could not start sooner anyway). Re-tried as every
        step starts and ends (`LiveRun.on_step`); a full call's worth of nodes, or `force`, compiles at once."""
        if not self.compiler.pending:
            return
        if not force and self.compiler.pending < self.p.compiler_config.max_batch_size and self.live.backlog():
            return
        start = time.perf_counter()
        steps = self.compiler.compile()
        self.compile_seconds += time.perf_counter() - start
        if steps:
            self.increments += 1
            self.live.submit(steps, self.compiler.graph, self.compiler.plan.aliases)

    def _on_step(self) -> None:
        if not self.compiler.pending:  # every step start and end calls this: skip the lock when nothing waits
            return
        with self._lock:
            self._compile()

    # --- answers ---------------------------------------------------------------------------------------
    def _answered(self, nid: str, result: NodeResult) -> None:
        if self.on_node is not None:
            self.on_node(nid, result)
        qid = result.query_id
        if qid in self.queries and nid == node_id(qid, "agg"):
            self.queries[qid].done.set()
            if self.on_done is not None:
                self.on_done(qid)

    def _query_result(self, qid: str) -> QueryResult:
        """Read from the query's own nodes, under the locks: other queries' parts keep arriving meanwhile."""
        q = self.queries[qid]
        routes = [q.parts[sq.index][1] for sq in q.decomposition.subqueries]
        own = Graph()
        with self._lock:
            for nid in q.nodes:
                own.add(self.original.nodes[nid])
        with self.live.lock:
            results = self.live.finish(own)
        return query_result(qid, q.text, node_id(qid, "agg"), q.decomposition, routes, own, results, 0.0)
