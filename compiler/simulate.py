"""The simulator: a second plan executor, on a virtual clock with the cost model (no weights, no sleeping).

For scale studies (1,000 queries x 16 experts on a simulated 80 GB GPU) and for checking the compiler:
the simulator follows the executor contract of `compiler/plan.py` exactly, through the same
`compiler.walker.PlanWalker` the real executor drives (a step starts once all its deps are done *and* its
stream is free; one stream runs its steps one at a time in plan order), and raises `PlanViolation` where a
real executor would crash or overflow: a generate whose model is not resident, an evict under a running
batch, reserved bytes over `plan.memory_budget` (the runtime base and a load's transient included).

Durations come from the cost model passed in (so a plan compiled with one cost model can be replayed
with another, e.g. a calibrated one): generate = `cost.batch_seconds(model, tokens of its nodes)`,
exactly what lowering stored in `Step.est_s` when it is the same cost model (without `plan.graph` the
tokens are unknown and `est_s` is used); load = `cost.load_seconds(model)`; evict = 0.

One GPU, several streams: by default (`shared_device=True`) generates that overlap on different compute
streams share the device equally (processor sharing: k running batches each progress at 1/k speed), so
extra streams never pretend to be extra GPUs; loads/evicts use the host link and overlap freely.
`shared_device=False` treats every compute stream as its own device (the plan's idealized estimate,
`Plan.estimated_span_s`, which the simulation then reproduces).

Lower bound = max(critical path, bytes read / bandwidth):
- critical path: the longest chain of simulated step durations through the deps (infinite streams);
- bytes read, per generate step: its model's weights once per decode step (every step of a batched decode
  reads all weights once; `CostModel.decode_steps` counts them, continuous refill included), plus the
  call's KV cache once (live rows x (longest prompt + longest output) x KV bytes/token, as allocated).
  Attention re-reads the growing cache at every decode step, but the cost model's decode time has no term
  for those re-reads (only the `batch_alpha` surcharge), so counting them would let the "bound" exceed the
  very durations it bounds; they are reported separately (`kv_reread_bytes`). Prefill is compute bound in the
  cost model, so its weight read is not counted either. Loads are host->device traffic, not HBM reads.
  With `shared_device=False` the bytes term is divided by the number of compute streams used.
The bound holds whenever the cost model is physically consistent with the bandwidth (every generate's
time >= its bytes / bandwidth, true of roofline costs at that bandwidth); `steps_faster_than_bandwidth`
counts the generates where it is not. `work_bound_s` (total generate seconds one device must run) is a
tighter bound on one shared GPU: the gap between it and the makespan is pure scheduling loss (compute
idle while waiting for loads or data).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Optional

from compiler import trace_events as te
from compiler.cost import CostModel
from compiler.plan import Plan, Step, StepKind
from compiler.walker import PlanWalker

#: H100 SXM HBM3 peak bandwidth (bytes/s): the default simulated GPU.
DEFAULT_BANDWIDTH_BPS = 3.35e12


class PlanViolation(ValueError):
    """The plan breaks the executor contract (a compiler bug, or a hand-edited plan)."""


class TraceSpan(NamedTuple):
    """One executed step: when and where it ran."""

    step: str
    stream: int
    start: float
    end: float
    kind: str
    model: str
    nodes: tuple[str, ...] = ()


@dataclass
class SimResult:
    makespan_s: float
    lower_bound_s: float  # max(critical_path_s, bytes_read_bound_s)
    critical_path_s: float
    bytes_read_bound_s: float
    bytes_read: int  # weights x decode steps + batch KV, over all generates (see module docstring)
    kv_reread_bytes: int  # KV the decode steps re-read (not in the bound; for reference)
    bandwidth_Bps: float
    work_bound_s: float  # total generate seconds / devices: what the compute streams must run at least
    loads: int
    evictions: int
    generates: int
    compute_streams: int  # plan.streams; stream index `compute_streams` is the load/evict stream
    shared_device: bool
    stream_busy_s: dict[int, float]  # wall seconds each stream had a step running
    stream_utilisation: dict[int, float]  # busy / makespan
    compute_busy_s: float  # wall seconds at least one generate was running
    peak_resident_bytes: int  # reserved footprints (load start -> evict), what the budget limits
    peak_used_bytes: int  # weights of loaded/loading models + KV of running batches
    memory_budget: Optional[int]
    steps_faster_than_bandwidth: int
    spans: list[TraceSpan] = field(default_factory=list, repr=False)  # in completion order
    memory_timeline: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (t, reserved bytes)

    @property
    def gap(self) -> float:
        """makespan / lower bound - 1 (0 = the plan is as fast as anything could be)."""
        return self.makespan_s / self.lower_bound_s - 1.0 if self.lower_bound_s > 0 else 0.0

    @property
    def compute_utilisation(self) -> float:
        return self.compute_busy_s / self.makespan_s if self.makespan_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers (no spans or timeline)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("spans", "memory_timeline")}
        out["stream_busy_s"] = {str(k): v for k, v in self.stream_busy_s.items()}
        out["stream_utilisation"] = {str(k): v for k, v in self.stream_utilisation.items()}
        out["gap"], out["compute_utilisation"] = self.gap, self.compute_utilisation
        return out


@dataclass(frozen=True)
class _Costs:
    """Per-step numbers the simulation and the bound need, computed once."""

    seconds: list[float]
    kv_bytes: list[int]  # generate: the batch's KV while it runs
    read_bytes: list[int]  # generate: bytes counted in the bound
    reread_bytes: list[int]  # generate: KV re-read by decode steps


def step_costs(plan: Plan, cost: CostModel) -> _Costs:
    """Durations and bytes of every step under `cost` (see the module docstring for what is counted)."""
    rows = [_step_cost(s, plan, cost) for s in plan.steps]
    return _Costs(*(list(col) for col in zip(*rows))) if rows else _Costs([], [], [], [])


def _step_cost(s: Step, plan: Plan, cost: CostModel) -> tuple[float, int, int, int]:
    """(seconds, KV bytes while running, bytes counted in the bound, KV re-read by decode steps)."""
    if s.kind is StepKind.LOAD:
        return cost.load_seconds(s.model), 0, 0, 0
    if s.kind in (StepKind.EVICT, StepKind.HOST):
        return 0.0, 0, 0, 0
    if s.kind is StepKind.RETRIEVE:  # a knowledge lookup on the host: the cost model's estimate, no model bytes
        return s.est_s, 0, 0, 0
    graph = plan.graph
    if graph is None:  # tokens unknown: trust the plan's estimate; only the batch KV counts as bytes
        return s.est_s, s.bytes, s.bytes, 0
    tokens = [cost.node_tokens(graph.nodes[n], graph) for n in s.nodes]
    mc = cost.cost(s.model)
    slots = s.slots or None
    kv = cost.batch_bytes(s.model, tokens, slots)
    steps = cost.decode_steps(tokens, slots)
    prompt, out = max((p for p, _ in tokens), default=0), max((o for _, o in tokens), default=0)
    reread = len(tokens) * mc.kv_bytes_per_token * (out * prompt + out * (out - 1) // 2)  # step t: prompt+t-1
    return cost.batch_seconds(s.model, tokens, slots), kv, mc.weight_bytes * steps + kv, reread


def simulate(plan: Plan, cost: CostModel, *, bandwidth_Bps: Optional[float] = None,
             shared_device: bool = True) -> SimResult:
    """Run `plan` on a virtual clock; O(steps log steps) (times the number of deps)."""
    bandwidth = DEFAULT_BANDWIDTH_BPS if bandwidth_Bps is None else bandwidth_Bps
    if not bandwidth > 0:
        raise ValueError(f"bandwidth_Bps must be positive, got {bandwidth_Bps!r}")
    steps = plan.steps
    index = _check_order(steps)
    costs = step_costs(plan, cost)
    run = _Run(plan, cost, costs, index, shared_device)
    run.go()

    critical = _critical_path(steps, index, costs.seconds)
    gen_idx = [i for i, s in enumerate(steps) if s.kind is StepKind.GENERATE]
    devices = 1 if shared_device else max(1, len({steps[i].stream for i in gen_idx}))
    bytes_read = sum(costs.read_bytes[i] for i in gen_idx)
    bytes_bound = bytes_read / (bandwidth * devices)
    faster = sum(1 for i in gen_idx if costs.seconds[i] < costs.read_bytes[i] / bandwidth * (1 - 1e-9))
    makespan = run.now
    busy = dict(sorted(run.busy.items()))
    return SimResult(
        makespan_s=makespan, lower_bound_s=max(critical, bytes_bound), critical_path_s=critical,
        bytes_read_bound_s=bytes_bound, bytes_read=bytes_read,
        kv_reread_bytes=sum(costs.reread_bytes[i] for i in gen_idx), bandwidth_Bps=bandwidth,
        work_bound_s=sum(costs.seconds[i] for i in gen_idx) / devices,
        loads=plan.count(StepKind.LOAD), evictions=plan.count(StepKind.EVICT), generates=len(gen_idx),
        compute_streams=plan.streams, shared_device=shared_device, stream_busy_s=busy,
        stream_utilisation={k: (v / makespan if makespan > 0 else 0.0) for k, v in busy.items()},
        compute_busy_s=run.compute_busy, peak_resident_bytes=run.peak_reserved, peak_used_bytes=run.peak_used,
        memory_budget=plan.memory_budget, steps_faster_than_bandwidth=faster, spans=run.spans,
        memory_timeline=run.timeline,
    )


def _check_order(steps: list[Step]) -> dict[str, int]:
    """Step id -> position; deps must name earlier steps (plan order is a topological order)."""
    index: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s.id in index:
            raise PlanViolation(f"duplicate step id {s.id!r}")
        for d in s.deps:
            if d not in index:
                raise PlanViolation(f"step {s.id!r} depends on {d!r}, which is not an earlier step of the plan")
        index[s.id] = i
    return index


def _critical_path(steps: list[Step], index: dict[str, int], seconds: list[float]) -> float:
    finish = [0.0] * len(steps)
    for i, s in enumerate(steps):
        finish[i] = max((finish[index[d]] for d in s.deps), default=0.0) + seconds[i]
    return max(finish, default=0.0)


class _Run:
    """The event loop. Two clocks: real time `now`, and for shared generates a virtual work clock `work`
    that advances at 1/k per second while k generates run (each finishes when `work` reaches its tag)."""

    def __init__(self, plan: Plan, cost: CostModel, costs: _Costs, index: dict[str, int], shared: bool):
        self.plan, self.cost, self.costs, self.index, self.shared = plan, cost, costs, index, shared
        self.walker = PlanWalker(plan.steps)
        self.start: dict[int, float] = {}
        self.timed: list[tuple[float, int, int]] = []  # (end time, seq, step)
        self.tagged: list[tuple[float, int, int]] = []  # (end work tag, seq, step): shared generates
        self.seq = 0
        self.now = self.work = 0.0
        self.gens = 0  # generates running
        # memory: the base and the models resident from the start are held throughout
        self.resident: dict[str, str] = {m: "loaded" for m in plan.initial}  # model -> "loading" | "loaded"
        self.reserved_of: dict[str, int] = {m: plan.footprints.get(m, 0) for m in plan.initial}
        self.gens_of: dict[str, int] = {}
        self.reserved = plan.base_bytes + sum(self.reserved_of.values())
        self.used = plan.base_bytes + sum(cost.cost(m).weight_bytes for m in plan.initial)
        self.peak_reserved, self.peak_used = self.reserved, self.used
        self.timeline: list[tuple[float, int]] = [(0.0, self.reserved)]
        # results
        self.busy: dict[int, float] = {s.stream: 0.0 for s in plan.steps}
        self.compute_busy = 0.0
        self.spans: list[TraceSpan] = []

    def go(self) -> None:
        self._start_ready()
        while self.timed or self.tagged:
            t_timed = self.timed[0][0] if self.timed else math.inf
            t_tagged = (self.now + max(self.tagged[0][0] - self.work, 0.0) * len(self.tagged)
                        if self.tagged else math.inf)
            if t_tagged <= t_timed:
                self._advance(t_tagged)
                tag, _, i = heapq.heappop(self.tagged)
                self.work = tag  # exact, no drift
            else:
                _, _, i = heapq.heappop(self.timed)
                self._advance(t_timed)
            self._complete(i)
        if not self.walker.finished:
            raise PlanViolation(f"{len(self.plan.steps) - len(self.spans)} step(s) never became ready (a dependency "
                                f"waits behind a later step of its stream); stuck stream heads: "
                                f"{self.walker.stuck_heads()}")

    def _advance(self, t: float) -> None:
        dt = t - self.now
        if self.tagged:
            self.work += dt / len(self.tagged)
        if self.gens:
            self.compute_busy += dt
        self.now = t

    def _start_ready(self) -> None:
        for s in self.walker.ready():
            i = self.index[s.id]
            self.start[i] = self.now
            self._on_start(s, i)
            seconds = self.costs.seconds[i]
            self.seq += 1
            if s.kind is StepKind.GENERATE and self.shared:
                heapq.heappush(self.tagged, (self.work + seconds, self.seq, i))
            else:
                heapq.heappush(self.timed, (self.now + seconds, self.seq, i))

    def _on_start(self, s: Step, i: int) -> None:
        state = self.resident.get(s.model)
        if s.kind is StepKind.LOAD:
            if state is not None:
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: {s.model!r} is already resident")
            self.resident[s.model] = "loading"
            self.reserved_of[s.model] = s.bytes or self.plan.footprints.get(s.model, 0)
            extra = self.plan.load_extra.get(s.model, 0)
            self._memory(self.reserved_of[s.model] + extra, self.cost.cost(s.model).weight_bytes + extra)
            budget = self.plan.memory_budget
            if budget is not None and self.reserved > budget:
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: {self.reserved:,} bytes reserved > budget "
                                    f"{budget:,} (resident: {', '.join(self.resident)})")
        elif s.kind is StepKind.GENERATE:
            if state != "loaded":
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: generate on {s.model!r}, which is "
                                    f"{'still loading' if state else 'not resident'}")
            self.gens_of[s.model] = self.gens_of.get(s.model, 0) + 1
            self.gens += 1
            self._memory(0, self.costs.kv_bytes[i])
        elif s.kind is StepKind.EVICT:
            if state != "loaded":
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: evicting {s.model!r}, which is "
                                    f"{'still loading' if state else 'not resident'}")
            if self.gens_of.get(s.model):
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: evicting {s.model!r} under a running batch")

    def _complete(self, i: int) -> None:
        s = self.plan.steps[i]
        self.walker.finish(s.id)
        start = self.start.pop(i)
        self.busy[s.stream] += self.now - start
        self.spans.append(TraceSpan(s.id, s.stream, start, self.now, s.kind.value, s.model, s.nodes))
        if s.kind is StepKind.LOAD:
            self.resident[s.model] = "loaded"
            extra = self.plan.load_extra.get(s.model, 0)
            self._memory(-extra, -extra)
        elif s.kind is StepKind.GENERATE:
            self.gens_of[s.model] -= 1
            self.gens -= 1
            self._memory(0, -self.costs.kv_bytes[i])
        elif s.kind is StepKind.EVICT:
            del self.resident[s.model]
            self._memory(-self.reserved_of.pop(s.model), -self.cost.cost(s.model).weight_bytes)
        self._start_ready()

    def _memory(self, reserved: int, used: int) -> None:
        self.reserved += reserved
        self.used += used
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.peak_used = max(self.peak_used, self.used)
        if reserved:
            self.timeline.append((self.now, self.reserved))


# --- Chrome trace-event JSON -------------------------------------------------------------------------

def to_chrome_trace(sim: SimResult, *, name: str = "compllm sim") -> dict[str, Any]:
    """Trace-event JSON (open in https://ui.perfetto.dev): one row per stream, one "X" event per step
    (name = step id), and a counter track of reserved GB, so load stalls and idle gaps are visible."""
    io = sim.compute_streams
    events: list[dict[str, Any]] = [te.process_name(1, name)]
    for stream in sorted({sp.stream for sp in sim.spans} | set(sim.stream_busy_s)):
        label = "load/evict" if stream == io else "host" if stream == io + 1 else f"compute {stream}"
        events.append(te.thread_name(1, stream, label))
    for sp in sorted(sim.spans, key=lambda sp: (sp.start, sp.stream)):
        events.append(te.span(sp.step, sp.kind, 1, sp.stream, sp.start, sp.end,
                              {"kind": sp.kind, "model": sp.model, "nodes": list(sp.nodes)}))
    for t, reserved in sim.memory_timeline:
        events.append(te.counter("reserved GB", 1, t, {"reserved GB": reserved / 1e9}))
    return te.trace(events, **{k: v for k, v in sim.summary().items() if isinstance(v, (int, float, str, type(None)))})
