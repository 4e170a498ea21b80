"""Run a compiled Plan: eager dataflow over its steps, one worker per stream, batches exactly as planned.

The executor never re-plans: which nodes share a call, which model is loaded or evicted when, and which
stream runs what were decided by the compiler. A step starts as soon as its dependencies are done
(`barrier=True` instead runs the steps one at a time in plan order: the `level` policy's barriers).
On CUDA each stream worker issues its work on its own `torch.cuda.Stream`.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Mapping

from compiler.ir import Graph, Node
from compiler.passes.fuse import split_answer
from compiler.plan import Plan, Step, StepKind
from compllm.runtime.context import ExecutionContext
from compllm.runtime.result import NodeResult
from compllm.runtime.trace import StepRecord

log = logging.getLogger(__name__)


class PlanExecutor:
    needs_plan = True

    def __init__(self, name: str = "compiled", barrier: bool = False):
        self.name = name
        self.barrier = barrier
        self.step_records: list[StepRecord] = []

    def run(self, graph: Graph, ctx: ExecutionContext, plan: Plan | None = None, progress=None) -> dict[str, NodeResult]:
        if plan is None or plan.graph is None:
            raise ValueError(f"policy {self.name!r} executes a compiled plan; none was given")
        run = _Run(plan, ctx, progress)
        if self.barrier:
            for step in plan.steps:
                run.execute(step)
        else:
            run.run_streams()
        self.step_records = run.records
        return run.finish(graph)


class _Run:
    """State of one plan execution, shared by the stream workers."""

    def __init__(self, plan: Plan, ctx: ExecutionContext, progress):
        self.plan, self.ctx, self.progress = plan, ctx, progress
        self.graph: Graph = plan.graph
        self.results: dict[str, NodeResult] = {}
        self.done = {s.id: threading.Event() for s in plan.steps}
        self.records: list[StepRecord] = []
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []

    # --- scheduling ---------------------------------------------------------------------------
    def run_streams(self) -> None:
        by_stream: dict[int, list[Step]] = defaultdict(list)
        for step in self.plan.steps:  # plan order is topological, so no stream can wait on a later step
            by_stream[step.stream].append(step)
        workers = [threading.Thread(target=self._worker, args=(sid, steps), name=f"compllm-stream-{sid}", daemon=True)
                   for sid, steps in sorted(by_stream.items())]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if self.errors:
            raise self.errors[0]

    def _worker(self, stream_id: int, steps: list[Step]) -> None:
        try:
            with _device_stream(self.ctx, stream_id):
                for step in steps:
                    for dep in step.deps:
                        self.done[dep].wait()
                    self.execute(step)
        except BaseException as exc:  # an executor bug: release every waiter, then re-raise in the caller
            self.errors.append(exc)
            for event in self.done.values():
                event.set()

    # --- steps --------------------------------------------------------------------------------
    def execute(self, step: Step) -> None:
        start = self.ctx.now()
        try:
            if step.kind is StepKind.LOAD:
                self.ctx.pool.get(step.model)
            elif step.kind is StepKind.EVICT:
                self.ctx.pool.evict(step.model)
            else:
                self._generate(step)
        finally:
            with self.lock:
                self.records.append(StepRecord(step.id, step.kind.value, step.model, step.stream, start,
                                               self.ctx.now(), step.nodes, step.slots))
            self.done[step.id].set()

    def _generate(self, step: Step) -> None:
        runnable: list[tuple[Node, NodeResult]] = []
        with self.lock:
            for node_id in step.nodes:
                node = self.graph.nodes[node_id]
                res = self.results[node_id] = self.ctx.new_result(node)
                res.start = self.ctx.now()
                blocked = self.ctx.blocked_by(node, self.results)
                passthrough = self.ctx.passthrough(node, self.results)
                if blocked:
                    res.status, res.error, res.end = "skipped", blocked, res.start
                elif passthrough is not None:
                    res.status, res.answer, res.end = "ok", passthrough, res.start
                else:
                    runnable.append((node, res))
            requests = [self.ctx.request(self.graph, node, self.results) for node, _ in runnable]
        if requests:
            outcomes = self.ctx.generate(step.model, requests, step.id, step.slots)
            with self.lock:
                end = self.ctx.now()
                for (node, res), request, outcome in zip(runnable, requests, outcomes):
                    res.prompt, res.end = request.messages[-1]["content"], end
                    self.ctx.record(res, outcome)
                    if not res.ok:
                        log.error("node %s failed: %s", node.id, res.error)
                    elif node.fused_from:
                        self._store_parts(node, res)
        if self.progress is not None:
            self.progress.update(len(step.nodes))

    def _store_parts(self, fused: Node, res: NodeResult) -> None:
        """A fused node's reply answers several original nodes: give each part node its share."""
        parts = split_answer(fused, res.answer)
        res.answer = parts.get(fused.id, res.answer)
        for node in self.graph:
            if node.part_of == fused.id:
                part = self.results[node.id] = self.ctx.new_result(node)
                part.start, part.end = res.start, res.end
                part.status, part.answer = "ok", parts.get(node.id, "")
                if not part.answer:
                    part.status, part.error = "failed", f"fused reply of {fused.id} has no part for {node.id}"

    # --- results ------------------------------------------------------------------------------
    def finish(self, original: Graph) -> dict[str, NodeResult]:
        """Results keyed by the *original* graph's node ids: deduped nodes take their kept twin's answer."""
        out: dict[str, NodeResult] = {}
        for node_id in original.nodes:
            kept = _resolve(node_id, self.plan.aliases)
            res = self.results.get(kept)
            if res is None:
                res = self.ctx.new_result(original.nodes[node_id])
                res.status, res.error = "skipped", "not part of any executed step (compiled away)"
            elif kept != node_id:
                twin = NodeResult(**{**res.__dict__, "node_id": node_id,
                                     "query_id": self.ctx.new_result(original.nodes[node_id]).query_id})
                twin.note = f"deduplicated: shares the answer of {kept}"
                res = twin
            out[node_id] = res
        return out


def _resolve(node_id: str, aliases: Mapping[str, str]) -> str:
    while node_id in aliases:
        node_id = aliases[node_id]
    return node_id


class _device_stream:
    """On CUDA, issue this worker's kernels on its own stream; elsewhere a no-op."""

    def __init__(self, ctx: ExecutionContext, stream_id: int):
        self.ctx, self.stream_id, self._cm = ctx, stream_id, None

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            self._cm = torch.cuda.stream(torch.cuda.Stream())
            self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self._cm is not None:
            import torch

            torch.cuda.current_stream().synchronize()  # results are read on the host by dependents' workers
            self._cm.__exit__(*exc)
        return False
