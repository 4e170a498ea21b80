"""The pipe: decompose -> route -> build and verify the IR -> execute -> aggregate, timed per stage."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

from compiler import CompilerConfig, Plan, compile
from compiler.build import BuildLimits, RoutedSubQuery, add_query
from compiler.ir import AnswerType, Graph
from compiler.verify import GraphError, verify
from compllm.backends.pool import ModelPool
from compllm.costing import build_cost_model
from compllm.experts import Expert
from compllm.frontend.decomposer import Decomposer, Decomposition
from compllm.frontend.router import EmbeddingRouter, Route
from compllm.runtime.context import AGGREGATOR, ExecutionContext
from compllm.runtime.faults import RetryPolicy
from compllm.runtime.memory import peak_memory_bytes
from compllm.runtime.prompts import Aggregator
from compllm.runtime.result import QueryResult, RunResult
from compllm.runtime.trace import chrome_trace

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, pool: ModelPool, experts: Mapping[str, Expert], decomposer: Decomposer,
                 router: EmbeddingRouter, aggregator: Aggregator, policy, max_answer_chars: int = 400,
                 compiler_config: CompilerConfig | None = None, cache_dir: str | None = None,
                 retry: RetryPolicy | None = None, auto_calibrate: bool = False):
        self.pool, self.experts = pool, dict(experts)
        self.decomposer, self.router, self.aggregator, self.policy = decomposer, router, aggregator, policy
        self.max_answer_chars = max_answer_chars
        self.compiler_config = compiler_config or CompilerConfig()
        self.cache_dir = cache_dir
        self.retry = retry or RetryPolicy()
        self.auto_calibrate = auto_calibrate
        self.timings: dict[str, float] = {}
        self._ready = False

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def model_aliases(self) -> list[str]:
        used = [self.decomposer.model, self.aggregator.model, *(e.model for e in self.experts.values())]
        return list(dict.fromkeys(used))

    def prepare(self) -> None:
        """Load every model and embed the experts before any query, so stage timings measure work, not loading."""
        if self._ready:
            return
        with self._stage("load_models"):
            for alias in self.model_aliases():
                self.pool.get(alias)
        with self._stage("fit_router"):
            self.router.fit(self.experts)
        self._ready = True

    def decompose(self, queries: Sequence[str]) -> list[Decomposition]:
        with self._stage("decompose"):
            return self.decomposer.decompose(self.pool.get(self.decomposer.model), queries)

    def route(self, decompositions: Sequence[Decomposition]) -> list[list[Route]]:
        with self._stage("route"):
            flat = [sq.text for d in decompositions for sq in d.subqueries]
            routes = iter(self.router.route(flat))
            return [[next(routes) for _ in d.subqueries] for d in decompositions]

    def build(self, decompositions: Sequence[Decomposition], routes: Sequence[Sequence[Route]]) -> Graph:
        with self._stage("build_graph"):
            graph = Graph()
            known = [*self.experts, AGGREGATOR]
            caps = self.decomposer  # the builder enforces the decomposer's caps again, for any caller
            limits = BuildLimits(caps.max_subqueries, max(caps.max_chars, caps.max_query_chars))
            for i, (d, rs) in enumerate(zip(decompositions, routes)):
                subqueries = [
                    RoutedSubQuery(sq.index, sq.text, sq.depends_on, r.expert, sq.answer_type, r.score, r.routed_by,
                                   self.experts[r.expert].max_new_tokens)
                    for sq, r in zip(d.subqueries, rs)
                ]
                listed = d.format == "enumerated" and self.aggregator.list_enumerated
                add_query(graph, f"q{i}", d.query, subqueries, AGGREGATOR, self.aggregator.max_new_tokens, limits,
                          AnswerType.LIST if listed else AnswerType.TEXT)
            verify(graph, known_experts=known)
            return graph

    def context(self) -> ExecutionContext:
        """A fresh execution context (its clock starts now) over the loaded models."""
        return ExecutionContext(self.pool, self.experts, self.aggregator, self.max_answer_chars, self.retry)

    def compile(self, graph: Graph) -> Plan:
        """Passes + lowering under the cost model of the loaded models (measured if calibrated)."""
        with self._stage("compile"):
            cost = build_cost_model(self.pool, self.experts, self.aggregator.model, self.cache_dir, AGGREGATOR,
                                    self.auto_calibrate)
            return compile(graph, cost, self.compiler_config)

    def run(self, queries: Sequence[str], progress: Callable[[int], Any] | None = None,
            decompositions: Sequence[Decomposition] | None = None) -> tuple[RunResult, Graph]:
        """`progress(total)` may return a tqdm-like bar that is advanced once per executed node. Baselines that
        split differently (route-only, dependencies dropped) pass their own `decompositions`."""
        self.timings = {}
        self._ready = False
        self.prepare()
        decompositions = list(decompositions) if decompositions is not None else self.decompose(queries)
        routes = self.route(decompositions)
        try:
            graph = self.build(decompositions, routes)
        except GraphError as exc:  # the parser guarantees a DAG, so this is a bug: say so loudly
            raise GraphError(f"the frontend produced an invalid graph: {exc}") from exc
        plan = self.compile(graph) if getattr(self.policy, "needs_plan", False) else None
        ctx = self.context()
        bar = progress(len(plan.graph) if plan else len(graph)) if progress else None
        try:
            with self._stage("execute"):
                node_results = self.policy.run(graph, ctx, plan=plan, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        out = []
        for (qid, query), d, rs in zip(graph.queries.items(), decompositions, routes):
            nodes = [node_results[n.id] for n in graph if n.provenance and n.provenance.query_id == qid]
            sink = node_results[query.sink]
            out.append(QueryResult(
                id=qid,
                query=query.text,
                final_answer=sink.answer if sink.ok else f"(no answer: {sink.error})",
                partial=not all(r.ok for r in nodes),
                decomposition={
                    "fallback": d.fallback, "reason": d.reason, "format": d.format, "warnings": list(d.warnings),
                    "raw_output": d.raw_output,
                    "subqueries": [
                        {**asdict(sq), "expert": r.expert, "route_score": round(r.score, 4), "routed_by": r.routed_by}
                        for sq, r in zip(d.subqueries, rs)
                    ],
                },
                nodes=nodes,
                latency=sink.end,
            ))
        models = {
            alias: {"name": m.name, "load_seconds": round(m.stats.load_seconds, 3), "calls": m.stats.calls,
                    "prompt_tokens": m.stats.prompt_tokens, "output_tokens": m.stats.output_tokens}
            for alias, m in self.pool.loaded().items()
        }
        errors = [f"{r.node_id}: {r.error}" for q in out for r in q.nodes if r.status == "failed"]
        timings = {k: round(v, 3) for k, v in self.timings.items()}
        trace = chrome_trace(self.policy.name, node_results.values(), self.policy.step_records)
        memory = {"measured_peak_bytes": peak_memory_bytes(),
                  "planned_peak_bytes": plan.peak_planned_bytes if plan else None,
                  "budget_bytes": self.compiler_config.memory_budget}
        return RunResult(self.policy.name, out, timings, models, errors, plan.to_dict() if plan else None, trace,
                         memory), graph
