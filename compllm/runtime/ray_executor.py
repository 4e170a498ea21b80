"""Run a compiled Plan across a Ray cluster: one actor per model replica, placed where the plan says.

The plan decides placement (`Step.node`, written by the `place` pass, or by hand): a load/evict/generate step
with a node runs on a Ray actor pinned to that node by the node's Ray custom resource of the same name; a step
with no node (`""`) runs in this process, exactly as the local executor runs it. The runtime never re-plans and
never lets Ray choose a node: a node the cluster does not have is refused before any step runs.

* `load` creates the replica's actor (its constructor loads the model through compllm's `ModelPool`, so
  weights, dtype, cache and fault injection are the local ones) and waits until it is ready; `evict` kills it,
  so its memory really goes back to the node.
* `generate` builds prompts and records results in this process (the local executor's own code: `LiveRun`,
  subclassed, only `_load`/`_evict`/`_call`/`_record` differ) and sends the batch to the actor under the
  experts' retry policies (`compllm/runtime/faults.py`).
* Faults: an actor that dies mid-call (killed, its node lost) is restarted by Ray up to `max_restarts` times,
  reloading its model in its constructor; the call fails with `ActorLostError` (a backend fault, `error`), and
  the retry policy asks the restarted actor again. With no restart or attempt left the step fails with the
  reason and its dependents are skipped, as locally. Ray never retries a call on its own (`max_task_retries=0`),
  so no request is answered twice.
* The coordinator is an asyncio loop over the shared `PlanWalker`: each ready step is a task; the blocking part
  of a step (the retry loop around `ray.wait`, which may sleep for backoff) runs in a worker thread.
* Trace: one row per actor (`StepRecord.worker = "<model>@<node>"`), local steps keep their stream rows.

Ray is imported only when a Ray executor runs (optional extra `compllm[ray]`, `make setup-ray`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from compiler.ir import Graph
from compiler.plan import Step, StepKind
from compiler.walker import PlanWalker
from compllm.backends.base import BackendError, Generation, GenerationRequest
from compllm.runtime.context import ExecutionContext
from compllm.runtime.executor import LiveRun, PlanExecutor
from compllm.runtime.faults import CallOutcome, generate_with_retry
from compllm.runtime.result import NodeResult
from compllm.runtime.trace import StepRecord

log = logging.getLogger(__name__)

#: The package root of the running compllm: Ray workers get it on PYTHONPATH, so actors run this code.
_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class RayClusterConfig:
    """The executor-facing settings of `cluster=ray` (conf/cluster/ray.yaml); also its structured-config schema.

    `address`: a running cluster (`"auto"`, `"ray://host:10001"`, `"host:6379"`); null = the Ray this process is
    already connected to, else a local one started here (with `num_cpus`, `object_store_memory`)."""

    address: Optional[str] = None
    namespace: str = "compllm"
    max_restarts: int = 1  # Ray restarts a dead actor (reloading its model) this many times
    num_cpus: Optional[int] = None  # a local Ray started here
    object_store_memory: Optional[int] = None  # bytes, a local Ray started here (results are small)
    include_dashboard: bool = False
    node_resource: float = 0.001  # how much of a node's custom resource one actor takes (many actors per node)
    threads: Optional[int] = None  # torch threads in each actor; null = Ray's default for the worker
    restart_timeout_s: float = 600.0  # how long a call waits for a dead actor's restart (model reload) to finish

    def __post_init__(self) -> None:
        if self.max_restarts < -1 or not 0 < self.node_resource <= 1:
            raise ValueError("cluster: max_restarts >= -1 (-1 = forever), 0 < node_resource <= 1")


class ActorLostError(BackendError):
    """The actor holding a model died during a call (killed, out of memory, its node gone)."""


class UnknownNodeError(ValueError):
    """A plan step names a cluster node the running Ray cluster does not have."""


# --- the actor ------------------------------------------------------------------------------------------------
class ModelReplica:
    """One model replica on one node: loads the model in its constructor (so a restart reloads it), then answers
    generate calls; `cancel` stops a running call at its next decode step (a timed-out attempt).
    Run as a threaded Ray actor, so `cancel` and `busy` are answered while `generate` runs."""

    def __init__(self, alias: str, spec: dict, cache_dir: str | None, threads: int | None):
        from compllm.backends.pool import ModelPool

        if threads:
            import torch

            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.alias, self.pool = alias, ModelPool({alias: spec}, cache_dir=cache_dir)
        self.backend = self.pool.get(alias)
        self.load_seconds = time.perf_counter() - started
        self._cancel: dict[str, threading.Event] = {}
        self._running = 0

    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "load_seconds": self.load_seconds}

    def generate(self, requests: list[GenerationRequest], max_live_rows: int | None, call_id: str) -> list[Generation]:
        cancel = self._cancel[call_id] = threading.Event()
        self._running += 1
        try:
            return list(self.backend.generate(requests, max_live_rows=max_live_rows, cancel=cancel))
        finally:
            self._running -= 1
            self._cancel.pop(call_id, None)

    def cancel(self, call_id: str) -> None:
        event = self._cancel.get(call_id)
        if event is not None:
            event.set()

    def busy(self) -> int:
        """Calls running now (tests kill an actor mid-call)."""
        return self._running

    def stats(self) -> dict[str, Any]:
        s = self.backend.stats
        return {"load_seconds": round(self.load_seconds, 3), "calls": s.calls, "prompt_tokens": s.prompt_tokens,
                "output_tokens": s.output_tokens, "generate_seconds": round(s.generate_seconds, 3)}


def _ray():
    try:
        import ray
    except ImportError as exc:  # the optional extra
        raise RuntimeError("cluster=ray needs Ray: `make setup-ray` (or pip install 'compllm[ray]')") from exc
    return ray


class Replicas:
    """The live actors, one per (model alias, node). Shared by the runs of one executor: a replica the plan did
    not evict stays resident for the next run, like a model in the local pool."""

    def __init__(self, config: RayClusterConfig):
        self.config = config
        self.actors: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()
        self.token = uuid.uuid4().hex[:8]  # actor names: unique per executor, readable in `ray list actors`

    @staticmethod
    def label(model: str, node: str) -> str:
        return f"{model}@{node}"

    def load(self, model: str, node: str, spec: dict, cache_dir: str | None) -> None:
        ray = _ray()
        with self.lock:
            actor = self.actors.get((model, node))
        if actor is None:
            cls = ray.remote(ModelReplica)
            actor = cls.options(
                name=f"compllm:{self.label(model, node)}:{self.token}", namespace=self.config.namespace,
                resources={node: self.config.node_resource}, num_cpus=0, max_concurrency=4,
                max_restarts=self.config.max_restarts, max_task_retries=0,
                runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
            ).remote(model, spec, cache_dir, self.config.threads)
            with self.lock:
                self.actors[(model, node)] = actor
        try:
            ray.get(actor.ready.remote())
        except Exception as exc:  # noqa: BLE001 - the load failed on the node: say where and why
            if wait_until_ready(actor, self.config.restart_timeout_s):  # it died while loading and is back
                return
            with self.lock:
                self.actors.pop((model, node), None)
            raise BackendError(f"loading {model!r} on node {node!r} failed: {_reason(exc)}") from None

    def evict(self, model: str, node: str) -> None:
        with self.lock:
            actor = self.actors.pop((model, node), None)
        if actor is not None:
            _ray().kill(actor, no_restart=True)

    def get(self, model: str, node: str):
        with self.lock:
            actor = self.actors.get((model, node))
        if actor is None:
            from compllm.backends.pool import NotResidentError

            raise NotResidentError(f"model {model!r} has no replica on node {node!r}, but a plan step uses it: the "
                                   "plan's load steps and this run disagree (a compiler or executor bug)")
        return actor

    def shutdown(self) -> None:
        for model, node in list(self.actors):
            self.evict(model, node)


def _pythonpath() -> str:
    return os.pathsep.join(p for p in [_ROOT, os.environ.get("PYTHONPATH", "")] if p)


def _reason(exc: BaseException) -> str:
    """The remote exception's own type and message, without Ray's wrapping and remote traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def wait_until_ready(actor: Any, timeout_s: float) -> bool:
    """Wait while Ray restarts the actor (its constructor reloads the model): True once it answers, False if it
    is dead for good (no restarts left) or still not back after `timeout_s`."""
    ray = _ray()
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            ray.get(actor.ready.remote(), timeout=max(end - time.monotonic(), 0.1))
            return True
        except ActorDiedError:
            return False
        except ActorUnavailableError:
            time.sleep(0.2)
        except GetTimeoutError:
            break
    return False


Attempt = Callable[[list[GenerationRequest], threading.Event], list[Generation]]


def remote_call(actor: Any, label: str, slots: int, what: str, restart_timeout_s: float = 600.0) -> Attempt:
    """One attempt of a generate step on an actor, as `generate_with_retry` calls it: a dead actor becomes
    `ActorLostError` (a retryable fault), a remote backend error its own exception, and a cancel (timeout) is
    forwarded to the actor, the attempt lasting until the actor has really stopped."""
    ray = _ray()
    from ray.exceptions import RayActorError, RayTaskError

    def call(batch: list[GenerationRequest], cancel: threading.Event) -> list[Generation]:
        call_id = f"{what}#{time.monotonic_ns()}"
        ref = actor.generate.remote(list(batch), slots or None, call_id)
        forwarded = False
        while not ray.wait([ref], timeout=0.1)[0]:
            if cancel.is_set() and not forwarded:
                actor.cancel.remote(call_id)
                forwarded = True
        try:
            return ray.get(ref)
        except RayActorError as exc:
            # Ray fails calls to a restarting actor instead of queueing them: end this attempt only once the
            # replica is back (or dead for good), so the retry policy's next attempt finds its model loaded.
            back = wait_until_ready(actor, restart_timeout_s)
            raise ActorLostError(f"actor {label} died during {what}: {_reason(exc)}"
                                 + ("; Ray restarted it" if back else "; it is not restarted")) from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
            if cause is not None:
                raise cause from None
            raise BackendError(f"actor {label}, {what}: {_reason(exc)}") from None

    return call


# --- the run ------------------------------------------------------------------------------------------------
class RayRun(LiveRun):
    """The local executor's `LiveRun` with placed steps carried out on actors and an asyncio coordinator."""

    def __init__(self, ctx: ExecutionContext, replicas: Replicas, progress: Any = None, barrier: bool = False,
                 on_answer: Callable[[str, NodeResult], None] | None = None,
                 on_text: Callable[[str, str], None] | None = None,
                 check: Callable[[list[Step]], None] | None = None):
        super().__init__(ctx, progress, barrier=barrier, on_answer=on_answer, on_text=on_text)
        self.replicas, self.check = replicas, check

    def submit(self, steps: list[Step], graph: Graph, aliases=None) -> None:
        """Placement is checked against the live cluster as steps arrive (a whole plan, or an increment)."""
        if self.check is not None:
            self.check(list(steps))
        super().submit(steps, graph, aliases)

    def _load(self, step: Step) -> None:
        if not step.node:
            return super()._load(step)
        self.replicas.load(step.model, step.node, self.ctx.pool.spec(step.model), self.ctx.pool.cache_dir)

    def _evict(self, step: Step) -> None:
        if not step.node:
            return super()._evict(step)
        self.replicas.evict(step.model, step.node)

    def _call(self, step: Step, requests: list, policies: list, on_text) -> list[CallOutcome]:
        if not step.node:
            return super()._call(step, requests, policies, on_text)
        label = Replicas.label(step.model, step.node)
        call = remote_call(self.replicas.get(step.model, step.node), label, step.slots, step.id,
                           self.replicas.config.restart_timeout_s)
        outcomes = generate_with_retry(call, list(requests), policies, step.id)
        if on_text is not None:  # an actor's replies come back whole: stream each once, as it arrives
            for i, outcome in enumerate(outcomes):
                if outcome.ok:
                    on_text(i, outcome.generation.text)
        return outcomes

    def _record(self, step: Step, start: float, end: float) -> StepRecord:
        record = super()._record(step, start, end)
        if step.node and step.kind in (StepKind.LOAD, StepKind.EVICT, StepKind.GENERATE):
            record = replace(record, worker=Replicas.label(step.model, step.node))
        return record

    # --- the asyncio coordinator ----------------------------------------------------------------------
    def _run_eagerly(self) -> None:
        asyncio.run(self._coordinate())

    async def _coordinate(self) -> None:
        self._pending_steps = []
        loop = asyncio.get_running_loop()
        walker = PlanWalker()
        running: dict[asyncio.Future, str] = {}
        getter: asyncio.Future | None = None
        open_ = True
        # Steps block on their actor (and sleep between retries): one thread per running step, at most one per
        # stream (the walker's contract), so the pool never holds a ready step back.
        threads = ThreadPoolExecutor(64, thread_name_prefix="compllm-ray-step")
        try:
            while True:
                while True:  # take every event already queued
                    try:
                        open_ = self._take(self._events.get_nowait()) and open_
                    except queue.Empty:
                        break
                if self._pending_steps:
                    walker.extend(self._pending_steps)
                    self._pending_steps = []
                for step in walker.ready():
                    running[loop.run_in_executor(threads, self.execute, step)] = step.id
                if not open_ and not running:
                    if not walker.finished:
                        raise RuntimeError(f"plan steps never became ready: {walker.stuck_heads()} (the plan breaks "
                                           "the executor contract; Plan.verify() should have refused it)")
                    return
                waits = set(running)
                if open_:
                    getter = getter or loop.run_in_executor(threads, self._events.get)
                    waits.add(getter)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut is getter:
                        open_ = self._take(fut.result()) and open_
                        getter = None
                    else:
                        fut.result()  # an executor bug is re-raised here
                        walker.finish(running.pop(fut))
        finally:
            if getter is not None and not getter.done():
                self._events.put(("close",))  # wake the event reader (the run is ending on an error)
            threads.shutdown(wait=True)  # no step keeps running behind the run's back


class RayExecutor(PlanExecutor):
    """A policy (`compiled`, `level`, `sequential`) run on a Ray cluster: `cluster=ray` (conf/cluster/ray.yaml)."""

    def __init__(self, name: str = "compiled", barrier: bool = False, cluster: RayClusterConfig | None = None):
        super().__init__(name, barrier)
        self.cluster = cluster or RayClusterConfig()
        if isinstance(self.cluster, dict):
            self.cluster = RayClusterConfig(**self.cluster)
        self.replicas = Replicas(self.cluster)

    def connect(self) -> None:
        """Join the configured cluster, the one this process is connected to, or start a local one."""
        ray = _ray()
        if ray.is_initialized():
            return
        c = self.cluster
        kwargs: dict[str, Any] = {"namespace": c.namespace, "include_dashboard": c.include_dashboard,
                                  "log_to_driver": False}
        if c.address:
            kwargs["address"] = c.address
        else:
            kwargs.update(num_cpus=c.num_cpus, object_store_memory=c.object_store_memory)
        ray.init(**kwargs)

    def nodes(self) -> dict[str, float]:
        """Custom resources of the live cluster (a node's name is its resource): the nodes a plan may name."""
        ray = _ray()
        standard = {"CPU", "GPU", "memory", "object_store_memory"}
        return {k: v for k, v in ray.cluster_resources().items() if k not in standard and not k.startswith("node:")
                and not k.startswith("accelerator_type:")}

    def check_placement(self, steps: list[Step]) -> None:
        """Every node a step names exists in the cluster now (else Ray would wait forever for it)."""
        placed = {s.node for s in steps if s.node}
        if not placed:
            return
        self.connect()
        known = self.nodes()
        missing = sorted(placed - set(known))
        if missing:
            raise UnknownNodeError(
                f"the plan places steps on node(s) {', '.join(map(repr, missing))}, but the Ray cluster has no such "
                f"custom resource (cluster nodes: {', '.join(sorted(known)) or 'none'}); start each node with "
                "`ray start --resources='{\"<name>\": 1}'` or recompile for this cluster")
        wrong = [s.id for s in steps if s.node and s.kind not in (StepKind.LOAD, StepKind.EVICT, StepKind.GENERATE)]
        if wrong:
            raise UnknownNodeError(f"steps {wrong[:3]} are placed on a node, but only load/evict/generate steps run "
                                   "on actors (host and retrieve steps run in this process)")

    def _live_run(self, ctx: ExecutionContext, progress: Any = None, **callbacks: Any) -> RayRun:
        """The execution that carries the steps out: placed steps on this cluster's actors (run and start, the
        online path, are PlanExecutor's)."""
        return RayRun(ctx, self.replicas, progress, barrier=self.barrier, check=self.check_placement, **callbacks)

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """`<model>@<node>` -> load time and token counts, asked of each live actor."""
        ray = _ray()
        out = {}
        for (m, n), actor in list(self.replicas.actors.items()):
            if wait_until_ready(actor, self.cluster.restart_timeout_s):
                out[Replicas.label(m, n)] = ray.get(actor.stats.remote())
        return out

    def shutdown(self) -> None:
        """Kill every replica this executor started (Ray itself stays up)."""
        self.replicas.shutdown()
