"""The pipe: plan (decompose) -> route -> build and verify the IR -> compile -> execute the plan, timed per stage.

`prepare()` does what a process does once: fit the router and build the cost model (calibrating a model
never measured on this machine). Every model call after that is either the planner's (through the same
retry/timeout path as the experts') or a step of the compiled plan; the runtime decides nothing on its own.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Sequence

from compiler import CompilerConfig, CostModel, Plan, compile
from compiler.build import BuildLimits, FinalAnswer, Retrieval, RoutedSubQuery, add_query
from compiler.cluster import ClusterSpec
from compiler.ir import AGGREGATOR, Graph
from compiler.verify import GraphError, verify
from compllm.backends.base import GenerationRequest
from compllm.backends.pool import ModelPool
from compllm.calibration import build_cost_model, recheck_calibration
from compllm.calibration.engines import with_engines
from compllm.cluster import resolve_cluster
from compllm.experts import Expert
from compllm.frontend.decomposer import Decomposer, Decomposition
from compllm.frontend.router import EmbeddingRouter, Route
from compllm.runtime.context import ExecutionContext
from compllm.runtime.executor import Executor
from compllm.runtime.faults import CallOutcome, RetryPolicy
from compllm.runtime.memory import peak_memory_bytes, start_run_window, window_peak_bytes
from compllm.runtime.prompts import Aggregator
from compllm.runtime.result import RunResult
from compllm.runtime.trace import StepRecord

log = logging.getLogger(__name__)

PLANNER_STREAM = -1  # the planner call's row in the trace, above the plan's streams


class Pipeline:
    def __init__(self, pool: ModelPool, experts: dict[str, Expert], decomposer: Decomposer,
                 router: EmbeddingRouter, aggregator: Aggregator, policy: Executor, max_answer_chars: int = 400,
                 compiler_config: CompilerConfig | None = None, cache_dir: str | None = None,
                 retry: RetryPolicy | None = None, auto_calibrate: bool = False, show_progress: bool = False,
                 cluster: ClusterSpec | None = None):
        self.pool, self.experts = pool, dict(experts)
        self.decomposer, self.router, self.aggregator, self.policy = decomposer, router, aggregator, policy
        self.max_answer_chars = max_answer_chars
        self.compiler_config = compiler_config or CompilerConfig()
        self.cluster = cluster  # where the `place` pass puts models; None / no nodes = this process
        self.cache_dir = cache_dir
        self.retry = retry or RetryPolicy()
        self.auto_calibrate = auto_calibrate
        self.show_progress = show_progress  # calibration's progress bar
        self.timings: dict[str, float] = {}
        self.cost: CostModel | None = None
        self.setup_peak_bytes = 0
        self.retrievers: dict = {}  # knowledge source key -> loaded Retriever (experts with `knowledge`)

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def model_aliases(self) -> list[str]:
        used = [self.decomposer.model, self.aggregator.model, *(e.model for e in self.experts.values()),
                *self.cascade_models()]  # escalations run there: planned, so calibrated and loaded
        return list(dict.fromkeys(used))

    def cascade_models(self) -> list[str]:
        """The model a planned cascade escalates to (none without a cascade)."""
        cascade = self.compiler_config.cascade
        return [] if cascade is None else [cascade.to_model]

    def expert_models(self) -> dict[str, str]:
        """Expert -> model alias, the aggregator included: the one mapping the compiler plans with."""
        return {**{name: e.model for name, e in self.experts.items()}, AGGREGATOR: self.aggregator.model}

    def prepare(self) -> None:
        """Once per process: fit the router, and build the cost model every compile uses."""
        if self.cost is not None:
            return
        with self._stage("fit_router"):
            self.router.fit(self.experts)
        with self._stage("calibrate"):
            self.cost = build_cost_model(self.pool, self.expert_models(), self.cache_dir, self.auto_calibrate,
                                         self.show_progress, also=[self.decomposer.model, *self.cascade_models()])
            prompts = {name: (e.model, e.system_prompt) for name, e in self.experts.items()}
            prompts[AGGREGATOR] = (self.aggregator.model, self.aggregator.system_prompt)
            self.cost = with_engines(self.cost, self.pool, prompts)
        knowledge = {name: e.knowledge for name, e in self.experts.items() if e.knowledge is not None}
        if knowledge:
            with self._stage("load_knowledge"):
                from compiler.cost import SourceCost
                from compllm.knowledge import Retrievers

                self.retrievers = Retrievers.for_experts(knowledge, self.cache_dir)
                self.cost = self.cost.with_sources(
                    {key: SourceCost(r.nbytes, r.query_s, r.call_s) for key, r in self.retrievers.items()},
                    {name: cfg.source_key() for name, cfg in knowledge.items()})
        self.setup_peak_bytes = peak_memory_bytes()
        start_run_window()

    # --- stages -----------------------------------------------------------------------------------
    def decompose(self, ctx: ExecutionContext, queries: Sequence[str], records: list[StepRecord]) -> list[Decomposition]:
        """The planner's call goes through the runtime's retry/timeout path and into the trace."""
        model = self.decomposer.model

        def call(requests: list[GenerationRequest]) -> list[CallOutcome]:
            if not self.pool.is_loaded(model) and self.compiler_config.memory_budget is not None:
                for alias in list(self.pool.loaded()):  # the planner's phase starts from an empty residency
                    self.pool.evict(alias)
            self.pool.get(model)  # the planner's model: loaded on demand, before any plan exists
            start = ctx.now()
            outcomes = ctx.generate(model, requests, [self.retry] * len(requests), "plan")
            records.append(StepRecord("plan", "plan", model, PLANNER_STREAM, start, ctx.now(),
                                      tuple(f"q{i}" for i in range(len(requests)))))
            return outcomes

        with self._stage("decompose"):
            return self.decomposer.decompose(call, queries)

    def route(self, decompositions: Sequence[Decomposition]) -> list[list[Route]]:
        with self._stage("route"):
            flat = [sq.text for d in decompositions for sq in d.subqueries]
            routes = iter(self.router.route(flat))
            return [[next(routes) for _ in d.subqueries] for d in decompositions]

    def build(self, decompositions: Sequence[Decomposition], routes: Sequence[Sequence[Route]]) -> Graph:
        with self._stage("build_graph"):
            graph = Graph()
            caps = self.decomposer  # the builder enforces the decomposer's caps again, for any caller
            limits = BuildLimits(caps.max_subqueries, max(caps.max_chars, caps.max_query_chars))
            for i, (d, rs) in enumerate(zip(decompositions, routes)):
                subqueries = [
                    RoutedSubQuery(sq.index, sq.text, sq.depends_on, r.expert, sq.answer_type, r.score, r.routed_by,
                                   self.experts[r.expert].max_new_tokens)
                    for sq, r in zip(d.subqueries, rs)
                ]
                add_query(graph, f"q{i}", d.query, subqueries, AGGREGATOR, self.aggregator.max_new_tokens, limits,
                          self.final_answer(d), self.retrievals())
            verify(graph, known_experts=[*self.experts, AGGREGATOR])
            return graph

    def retrievals(self) -> dict[str, Retrieval]:
        """Expert -> its knowledge source as the graph builder needs it (experts without one: closed-book)."""
        return {name: Retrieval(e.knowledge.source_key(), e.knowledge.k, e.knowledge.max_passage_chars)
                for name, e in self.experts.items() if e.knowledge is not None}

    def final_answer(self, d: Decomposition) -> FinalAnswer:
        """Joined (no model call) unless the aggregator is set to write it and there is something to merge:
        numbered questions always get their answers back as a list."""
        if d.format == "enumerated" or self.aggregator.mode is FinalAnswer.every:
            return FinalAnswer.every  # the user asked each numbered question, also those a later one reads
        if self.aggregator.mode is FinalAnswer.join:
            return FinalAnswer.join
        if len(d.subqueries) == 1 and self.aggregator.skip_single:
            return FinalAnswer.join
        return FinalAnswer.model

    def context(self) -> ExecutionContext:
        """A fresh execution context (its clock starts now) over the loaded models."""
        return ExecutionContext(self.pool, self.experts, self.aggregator, self.max_answer_chars, self.retry,
                                knowledge=self.retrievers)

    def compile(self, graph: Graph) -> Plan:
        """Passes + lowering under the process's cost model; models already loaded start resident."""
        return self.compile_with(self.compiler_config, graph)

    def compile_with(self, config: CompilerConfig, graph: Graph) -> Plan:
        self.prepare()
        with self._stage("compile"):
            # a discovered cluster is read again at every compile: nodes that joined or left are planned for
            if self.cluster is not None and self.cluster.discover and hasattr(self.policy, "connect"):
                self.policy.connect()  # the Ray executor joins (or starts) its cluster, so its nodes can be read
            return compile(graph, self.cost, config, resident=self.pool.loaded(), cluster=resolve_cluster(self.cluster))

    # --- the whole pipe -----------------------------------------------------------------------------
    def run(self, queries: Sequence[str], progress: Callable[[int], Any] | None = None,
            decompositions: Sequence[Decomposition] | None = None,
            rewrite: Callable[[Decomposition], Decomposition] | None = None) -> tuple[RunResult, Graph]:
        """`progress(total)` may return a tqdm-like bar advanced once per executed node. Baselines that split
        differently pass their own `decompositions` (route-only) or `rewrite` the planner's (dependencies dropped)."""
        if decompositions is None and rewrite is None and self.decomposer.stream:
            return self.run_online(queries, progress)
        self.timings = {}
        self.prepare()
        ctx = self.context()
        records: list[StepRecord] = []
        if decompositions is None:
            decompositions = self.decompose(ctx, queries, records)
        decompositions = [rewrite(d) for d in decompositions] if rewrite else list(decompositions)
        planner_peak = self.planner_peak_bytes(decompositions)
        routes = self.route(decompositions)
        try:
            graph = self.build(decompositions, routes)
        except GraphError as exc:  # the parser guarantees a DAG, so this is a bug: say so loudly
            raise GraphError(f"the frontend produced an invalid graph: {exc}") from exc
        plan = self.compile(graph)
        bar = progress(len(plan.graph)) if progress else None
        execute_start = ctx.now()
        try:
            with self._stage("execute"):
                node_results = self.policy.run(plan, ctx, graph, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        records += self.policy.step_records
        recheck_calibration(self.cache_dir, plan, records, self.cost)
        memory = self.memory(plan, planner_peak)
        ids = list(graph.queries)
        result = RunResult.from_execution(self.policy.name, graph, dict(zip(ids, decompositions)),
                                          dict(zip(ids, routes)), node_results, plan, records, dict(self.timings),
                                          self.pool.loaded(), memory, execute_start)
        return result, graph

    def run_online(self, queries: Sequence[str], progress: Callable[[int | None], Any] | None = None
                   ) -> tuple[RunResult, Graph]:
        """The same answers, sooner: the planner is read while it writes and each complete part joins the
        running plan at once (see compllm/online.py)."""
        from compllm.online import OnlinePipe

        self.timings = {}
        self.prepare()
        bar = progress(None) if progress else None
        try:
            with self._stage("execute"):
                pipe = OnlinePipe(self, bar)
                ids = pipe.ask(queries)
                pipe.close()
        finally:
            if bar is not None:
                bar.close()
        self.timings["decompose"] = sum(r.end - r.start for r in pipe.records)
        self.timings["compile"] = pipe.compile_seconds
        self.timings["route"] = pipe.route_seconds
        decompositions = {qid: pipe.queries[qid].decomposition for qid in ids}
        routes = {qid: [pipe.queries[qid].parts[sq.index][1] for sq in d.subqueries] for qid, d in decompositions.items()}
        plan = pipe.compiler.plan
        recheck_calibration(self.cache_dir, plan, pipe.live.records, self.cost)
        result = RunResult.from_execution(
            self.policy.name, pipe.original, decompositions, routes, pipe.live.finish(pipe.original), plan,
            pipe.records + pipe.live.records, dict(self.timings), self.pool.loaded(),
            self.memory(plan, self.planner_peak_bytes(list(decompositions.values()))), 0.0, pipe.marks, ids)
        return result, pipe.original

    def memory(self, plan: Plan, planner_peak: int) -> dict[str, Any]:
        return {"measured_peak_bytes": window_peak_bytes(),
                "setup_peak_bytes": self.setup_peak_bytes,  # router fit + calibration, once per process
                "process_peak_bytes": peak_memory_bytes(),
                "planned_peak_bytes": max(plan.peak_planned_bytes, planner_peak),
                "planned_plan_peak_bytes": plan.peak_planned_bytes, "planned_planner_peak_bytes": planner_peak,
                "budget_bytes": self.compiler_config.memory_budget}

    def planner_peak_bytes(self, decompositions: Sequence[Decomposition]) -> int:
        """What the planner's phase holds: the base, the models then resident, and the planner's call."""
        cost, model = self.cost, self.decomposer.model
        resident = {m: cost.cost(m).weight_bytes for m in self.pool.loaded() if m in cost.models}
        outputs = [d.generation for d in decompositions if d.generation is not None]
        if outputs and model in cost.models:
            tokens = [(g.prompt_tokens, g.output_tokens) for g in outputs]
            resident[model] = cost.cost(model).weight_bytes + cost.batch_bytes(model, tokens)
        return cost.base_bytes + sum(resident.values())
