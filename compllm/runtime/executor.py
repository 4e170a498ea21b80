"""Run a compiled Plan: eager dataflow over its steps, one worker per stream, exactly as planned.

The executor never re-plans: which nodes share a call, which model is loaded or evicted when, which stream runs
what, and which nodes need no model call (host steps) were decided by the compiler. A coordinator asks the
shared `compiler.walker.PlanWalker` which steps may start (dependencies done, first of their stream) and hands
each to its stream's worker thread; a step counts as done only when its work has really ended (a timed-out
call included). `barrier=True` instead runs the steps one at a time in plan order: the `level` and
`sequential` policies. On CUDA each stream worker issues its kernels on its own `torch.cuda.Stream`.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Protocol

from compiler.chains import split_answer
from compiler.ir import Graph, Node, NodeKind
from compiler.plan import Plan, Step, StepKind
from compiler.walker import PlanWalker
from compllm.runtime.context import ExecutionContext
from compllm.runtime.host import run_host
from compllm.runtime.result import NodeResult
from compllm.runtime.trace import StepRecord

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What a policy is: a name, and a way to run a plan that returns every original node's result."""

    name: str
    step_records: list[StepRecord]

    def run(self, plan: Plan, ctx: ExecutionContext, original: Graph, progress: Any = None) -> dict[str, NodeResult]:
        ...


class PlanExecutor:
    def __init__(self, name: str = "compiled", barrier: bool = False):
        self.name = name
        self.barrier = barrier
        self.step_records: list[StepRecord] = []

    def run(self, plan: Plan, ctx: ExecutionContext, original: Graph, progress: Any = None) -> dict[str, NodeResult]:
        """Execute `plan`; results are keyed by `original`'s node ids (deduped nodes share their twin's answer)."""
        if plan.graph is None:
            raise ValueError(f"policy {self.name!r}: the plan carries no graph")
        run = self._live_run(ctx, progress)
        run.submit(plan.steps, plan.graph, plan.aliases)
        run.close()
        run.wait()
        self.step_records = run.records
        return run.finish(original)

    def start(self, ctx: ExecutionContext, progress: Any = None,
              on_answer: Callable[[str, NodeResult], None] | None = None,
              on_text: Callable[[str, str], None] | None = None) -> "LiveRun":
        """An execution that accepts plan increments while it runs (online compilation, serving)."""
        run = self._live_run(ctx, progress, on_answer=on_answer, on_text=on_text)
        run.start()
        return run

    def _live_run(self, ctx: ExecutionContext, progress: Any = None, **callbacks: Any) -> "LiveRun":
        """The execution that carries the steps out: here, this process's stream threads."""
        return LiveRun(ctx, progress, barrier=self.barrier, **callbacks)


class LiveRun:
    """One plan execution, fed steps (the whole plan, or increments of it) and run by a coordinator: it asks the
    shared walker which steps may start and hands each to its stream's worker thread; a step is done when its
    work has really ended. Events (new steps, finished steps, closing) go through one queue, so the coordinator
    is the only one that touches the walker.

    `cancel(query_id)`: the query's nodes that have not started are skipped when their step comes (a started
    step finishes); a node another live query also needs (deduplicated or fused with it) still runs.
    `on_text(node id, text so far)`: the final-answer nodes' replies, streamed as they are written."""

    def __init__(self, ctx: ExecutionContext, progress: Any = None, barrier: bool = False,
                 on_answer: Callable[[str, NodeResult], None] | None = None,
                 on_text: Callable[[str, str], None] | None = None):
        self.ctx, self.progress, self.barrier = ctx, progress, barrier
        self.on_answer, self.on_text = on_answer, on_text
        self.graph = Graph()
        self.aliases: dict[str, str] = {}
        self.results: dict[str, NodeResult] = {}
        self.records: list[StepRecord] = []
        self.lock = threading.Lock()
        self.parts_of: dict[str, list[str]] = {}  # fused node -> its part nodes
        self.cancelled: set[str] = set()  # query ids whose not-started nodes are skipped
        self._aliased_to: dict[str, set[str]] = {}  # kept node -> the deduplicated nodes it answers for
        self._events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._not_started: set[str] = set()  # generate steps submitted and not started yet
        self.on_step: Callable[[], None] | None = None  # called as a step starts and as it ends (online batching)

    def backlog(self) -> int:
        """Generate steps submitted that have not started: work the streams already have waiting."""
        with self.lock:
            return len(self._not_started)

    # --- feeding ------------------------------------------------------------------------------
    def submit(self, steps: list[Step], graph: Graph, aliases: Mapping[str, str] | None = None) -> None:
        """Append steps (their deps name earlier steps) and the graph that names their nodes (a superset of
        the previous one)."""
        self._events.put(("steps", list(steps), graph, dict(aliases or {})))

    def close(self) -> None:
        """No more steps will come: the run ends once every submitted step is done."""
        self._events.put(("close",))

    def cancel(self, query_id: str) -> None:
        """Skip the query's nodes that have not started (a client went away, a deadline passed)."""
        with self.lock:
            self.cancelled.add(query_id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.wait, name="compllm-coordinator", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a started run to end (after close()); re-raises an executor bug."""
        self._finished.wait(timeout)
        if self._error is not None:
            raise self._error
        return self._finished.is_set()

    # --- the coordinator ----------------------------------------------------------------------
    def wait(self) -> None:
        """Run every submitted step until closed and drained (in the calling thread)."""
        try:
            if self.barrier:
                self._run_in_order()
            else:
                self._run_eagerly()
        except BaseException as exc:  # an executor bug: kept for join(), re-raised here too
            self._error = exc
            raise
        finally:
            self._finished.set()

    def _take(self, event: tuple) -> bool:
        """Apply a feeding event; returns False on close."""
        if event[0] == "close":
            return False
        _, steps, graph, aliases = event
        with self.lock:
            self.graph = graph
            self.aliases.update(aliases)
            for removed, kept in aliases.items():
                self._aliased_to.setdefault(kept, set()).add(removed)
            self.parts_of = {}
            for node in graph:
                if node.part_of is not None:
                    self.parts_of.setdefault(node.part_of, []).append(node.id)
            self._not_started.update(s.id for s in steps if s.kind is StepKind.GENERATE)
        self._pending_steps.extend(steps)
        return True

    def _run_in_order(self) -> None:
        """`barrier`: one step at a time, in plan order (the level and sequential policies)."""
        self._pending_steps: list[Step] = []
        open_ = True
        while open_ or self._pending_steps:
            if not self._pending_steps:
                open_ = self._take(self._events.get())
                continue
            self.execute(self._pending_steps.pop(0))

    def _run_eagerly(self) -> None:
        self._pending_steps = []
        walker = PlanWalker()
        workers: dict[int, ThreadPoolExecutor] = {}
        running = 0
        open_ = True
        try:
            while open_ or running or not walker.finished:
                if self._pending_steps:
                    walker.extend(self._pending_steps)
                    self._pending_steps = []
                for step in walker.ready():
                    if step.stream not in workers:
                        workers[step.stream] = ThreadPoolExecutor(1, thread_name_prefix=f"compllm-stream-{step.stream}",
                                                                  initializer=_bind_device_stream)
                    future = workers[step.stream].submit(self.execute, step)
                    future.add_done_callback(lambda f, sid=step.id: self._events.put(("done", sid, f)))
                    running += 1
                if not open_ and not running:
                    if not walker.finished:
                        raise RuntimeError(f"plan steps never became ready: {walker.stuck_heads()} (the plan breaks "
                                           "the executor contract; Plan.verify() should have refused it)")
                    break
                event = self._events.get()
                if event[0] == "done":
                    running -= 1
                    event[2].result()  # an executor bug is re-raised here
                    walker.finish(event[1])
                else:
                    open_ = self._take(event) and open_
        finally:
            for pool in workers.values():
                pool.shutdown(wait=True)

    # --- steps --------------------------------------------------------------------------------
    def execute(self, step: Step) -> None:
        start = self.ctx.now()
        with self.lock:
            self._not_started.discard(step.id)
        if self.on_step is not None:
            self.on_step()
        try:
            if step.kind is StepKind.LOAD:
                self._load(step)
            elif step.kind is StepKind.EVICT:
                self._evict(step)
            elif step.kind is StepKind.HOST:
                self._host(step)
            elif step.kind is StepKind.RETRIEVE:
                self._retrieve(step)
            else:
                self._generate(step)
                _synchronize_device()
        finally:
            with self.lock:
                self.records.append(self._record(step, start, self.ctx.now()))
            if self.on_step is not None:
                self.on_step()

    # Where a step's model work happens: this process's pool here; a cluster executor (compllm/runtime/ray_executor.py)
    # overrides these three and nothing else of the step logic.
    def _load(self, step: Step) -> None:
        self.ctx.pool.get(step.model)

    def _evict(self, step: Step) -> None:
        self.ctx.pool.evict(step.model)

    def _call(self, step: Step, requests: list, policies: list, on_text: Callable[[int, str], None] | None) -> list:
        """One generate step's model call under the retry policies: one CallOutcome per request."""
        return self.ctx.generate(step.model, requests, policies, step.id, step.slots, on_text)

    def _record(self, step: Step, start: float, end: float) -> StepRecord:
        return StepRecord(step.id, step.kind.value, step.model, step.stream, start, end, step.nodes, step.slots)

    def _is_cancelled(self, node_id: str) -> bool:
        """Every query the node answers for (its own, its fused parts', its deduplicated twins') is cancelled."""
        if not self.cancelled:
            return False
        ids = [node_id, *self.parts_of.get(node_id, ())]
        ids += [twin for nid in ids for twin in self._aliased_to.get(nid, ())]
        owners = {self.graph.nodes[nid].provenance.query_id if nid in self.graph.nodes
                  and self.graph.nodes[nid].provenance else nid.split(":", 1)[0] for nid in ids}
        return owners <= self.cancelled

    def _host(self, step: Step) -> None:
        with self.lock:
            for node_id in step.nodes:
                node = self.graph.nodes[node_id]
                res = self.results[node_id] = self.ctx.new_result(node, "")
                res.start = self.ctx.now()
                if self._is_cancelled(node_id):
                    res.status, res.error = "skipped", "cancelled"
                else:
                    res.answer, res.error = run_host(node, self.results)
                    res.status = "ok" if not res.error else "failed"
                res.end = self.ctx.now()
        self._advance(step)
        self._announce(step.nodes)

    def _retrieve(self, step: Step) -> None:
        """One batched lookup for the step's retrieve nodes (as planned); each node's answer is its passages."""
        runnable: list[tuple[Node, NodeResult]] = []
        with self.lock:
            for node_id in step.nodes:
                node = self.graph.nodes[node_id]
                res = self.results[node_id] = self.ctx.new_result(node, "")
                res.start = self.ctx.now()
                blocked = "cancelled" if self._is_cancelled(node_id) else self.ctx.blocked_by(node, self.results)
                if blocked:
                    res.status, res.error, res.end = "skipped", blocked, res.start
                else:
                    runnable.append((node, res))
            results = dict(self.results)
        found = self.ctx.lookup([n for n, _ in runnable], results) if runnable else []
        with self.lock:
            end = self.ctx.now()
            for (node, res), (question, passages, error) in zip(runnable, found):
                res.prompt, res.answer, res.error, res.end = question, passages, error, end
                res.status, res.batch_size, res.attempts = ("failed" if error else "ok"), len(runnable), 1
                if error:
                    log.error("node %s failed: %s", node.id, error)
        self._advance(step)
        self._announce(step.nodes)

    def _generate(self, step: Step) -> None:
        runnable: list[tuple[Node, NodeResult]] = []
        with self.lock:
            for node_id in step.nodes:
                node = self.graph.nodes[node_id]
                res = self.results[node_id] = self.ctx.new_result(node, step.model)
                res.start = self.ctx.now()
                blocked = "cancelled" if self._is_cancelled(node_id) else self.ctx.blocked_by(node, self.results)
                if not blocked and node.guard is not None and not self.ctx.settle_guard(
                        node, res, self.results.get(node.guard.source)):
                    continue  # the plan's guard says the draft's answer stands: no model call for this node
                if blocked:
                    res.status, res.error, res.end = "skipped", blocked, res.start
                    self._skip_parts(node, res)
                else:
                    runnable.append((node, res))
            requests = [self.ctx.request(self.graph, node, self.results) for node, _ in runnable]
        if requests:
            on_text = None
            if self.on_text is not None and any(n.kind is NodeKind.AGGREGATE for n, _ in runnable):
                on_text = lambda row, text: self.on_text(runnable[row][0].id, text)  # noqa: E731
            outcomes = self._call(step, requests, [self.ctx.policy(n) for n, _ in runnable], on_text)
            with self.lock:
                end = self.ctx.now()
                for (node, res), request, outcome in zip(runnable, requests, outcomes):
                    res.prompt, res.end = request.messages[-1]["content"], end
                    self.ctx.record(res, outcome)
                    if not res.ok:
                        log.error("node %s failed: %s", node.id, res.error)
                        self._skip_parts(node, res)
                    elif node.fused_from:
                        self._store_parts(node, res)
        self._advance(step)
        self._announce([*step.nodes, *(p for n in step.nodes for p in self.parts_of.get(n, ()))])

    def _advance(self, step: Step) -> None:
        if self.progress is not None:
            self.progress.update(len(step.nodes))

    def _announce(self, node_ids) -> None:
        """Tell the listener (a server waiting for its requests' answers) which nodes are final now."""
        if self.on_answer is not None:
            for nid in node_ids:
                self.on_answer(nid, self.results[nid])

    def _store_parts(self, fused: Node, res: NodeResult) -> None:
        """A fused node's reply answers several original nodes: give each part node its share."""
        parts = split_answer(fused, res.answer)
        res.answer = parts.get(fused.id, res.answer)
        for part_id in self.parts_of.get(fused.id, ()):
            part = self.results[part_id] = self.ctx.new_result(self.graph.nodes[part_id], res.model)
            part.start, part.end = res.start, res.end
            part.status, part.answer = "ok", parts.get(part_id, "")
            if not part.answer:
                part.status, part.error = "failed", f"fused reply of {fused.id} has no part for {part_id}"

    def _skip_parts(self, fused: Node, res: NodeResult) -> None:
        for part_id in self.parts_of.get(fused.id, ()):
            part = self.results[part_id] = self.ctx.new_result(self.graph.nodes[part_id], res.model)
            part.start, part.end = res.start, res.end
            part.status, part.error = "skipped", f"part of {fused.id}, which {res.status}: {res.error}"

    # --- results ------------------------------------------------------------------------------
    def finish(self, original: Graph) -> dict[str, NodeResult]:
        """Results keyed by the *original* graph's node ids: deduped nodes take their kept twin's answer."""
        out: dict[str, NodeResult] = {}
        for node_id, node in original.nodes.items():
            kept = self.aliases.get(node_id, node_id)
            res = self.results.get(kept)
            if res is None:
                res = self.ctx.new_result(node, "")
                res.status, res.error = "skipped", "not part of any executed step (compiled away)"
            elif kept != node_id:
                twin = NodeResult(**{**res.__dict__, "node_id": node_id,
                                     "query_id": node.provenance.query_id if node.provenance else res.query_id})
                twin.note = f"deduplicated: shares the answer of {kept}"
                res = twin
            out[node_id] = res
        for node in self.graph:  # a cascade's drafts (added by the compiler): their answers, confidences and cost
            if node.guard is not None and node.guard.source in self.results and node.guard.source not in out:
                out[node.guard.source] = self.results[node.guard.source]
        return out


def _cuda() -> Any:
    """torch, when a backend imported it and a GPU is present; None otherwise (never imports torch itself)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def _bind_device_stream() -> None:
    """Worker initializer: on CUDA this worker thread issues its kernels on a stream of its own."""
    torch = _cuda()
    if torch is not None:
        torch.cuda.set_stream(torch.cuda.Stream())


def _synchronize_device() -> None:
    """Results are read on the host by dependents' workers: wait for this worker's stream."""
    torch = _cuda()
    if torch is not None:
        torch.cuda.current_stream().synchronize()
