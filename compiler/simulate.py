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

A cluster (a plan placed by the `place` pass, `plan.devices` non-empty): every device runs its own streams
side by side (see `compiler.walker`) and holds its own memory, checked against its own budget; the bytes and
work bounds divide by the number of devices (x compute streams per device, which then run as devices of
their own); `device_busy_s` is each device's generate seconds, and stream busy times are means over devices.

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

On a cluster `memory_bound_s` (see `memory_bound`) tightens the work bound with what memory forces: every
device idles until its first load ends, and a model too big to share a device with any other model leaves its
device idle for the whole of each of its loads. It is in `lower_bound_s` for placed plans.
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

Slot = tuple[str, str]  # (device "node/index" or "" for this process, model)

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
    where: str = ""  # on a cluster: the device ("node/index") it ran on


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
    # On a cluster (a placed plan): seconds each device ("node/index") ran generates; devices in the bounds.
    device_busy_s: dict[str, float] = field(default_factory=dict)
    devices: int = 1
    memory_bound_s: float = 0.0  # placed plans: work + the idle time memory forces, over devices (`memory_bound`)
    spans: list[TraceSpan] = field(default_factory=list, repr=False)  # in completion order
    memory_timeline: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (t, reserved bytes)

    @property
    def gap(self) -> float:
        """makespan / lower bound - 1 (0 = the plan is as fast as anything could be)."""
        return self.makespan_s / self.lower_bound_s - 1.0 if self.lower_bound_s > 0 else 0.0

    @property
    def compute_utilisation(self) -> float:
        """Share of the makespan the compute was busy (on a cluster: averaged over the devices)."""
        if self.makespan_s <= 0:
            return 0.0
        if self.device_busy_s:
            return sum(self.device_busy_s.values()) / (self.devices * self.makespan_s)
        return self.compute_busy_s / self.makespan_s

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
    if plan.devices:  # a placed plan: every device of the cluster could have run generates
        devices = max(1, len(plan.devices)) * plan.streams  # streams of a device run side by side there
    else:
        devices = 1 if shared_device else max(1, len({steps[i].stream for i in gen_idx}))
    device_busy: dict[str, float] = {k: 0.0 for k in plan.devices}
    for sp in run.spans:
        if sp.kind == StepKind.GENERATE.value and sp.where:
            device_busy[sp.where] += sp.end - sp.start
    bytes_read = sum(costs.read_bytes[i] for i in gen_idx)
    bytes_bound = bytes_read / (bandwidth * devices)
    faster = sum(1 for i in gen_idx if costs.seconds[i] < costs.read_bytes[i] / bandwidth * (1 - 1e-9))
    makespan = run.now
    busy = dict(sorted(run.busy.items()))
    memory = memory_bound(plan, cost, costs) if plan.devices else 0.0
    return SimResult(
        makespan_s=makespan, lower_bound_s=max(critical, bytes_bound, memory), critical_path_s=critical,
        bytes_read_bound_s=bytes_bound, bytes_read=bytes_read,
        kv_reread_bytes=sum(costs.reread_bytes[i] for i in gen_idx), bandwidth_Bps=bandwidth,
        work_bound_s=sum(costs.seconds[i] for i in gen_idx) / devices,
        loads=plan.count(StepKind.LOAD), evictions=plan.count(StepKind.EVICT), generates=len(gen_idx),
        compute_streams=plan.streams, shared_device=shared_device, stream_busy_s=busy,
        stream_utilisation={k: (v / makespan if makespan > 0 else 0.0) for k, v in busy.items()},
        compute_busy_s=run.compute_busy, peak_resident_bytes=run.peak_reserved, peak_used_bytes=run.peak_used,
        memory_budget=plan.memory_budget, steps_faster_than_bandwidth=faster, device_busy_s=device_busy,
        devices=devices, memory_bound_s=memory, spans=run.spans,
        memory_timeline=run.timeline,
    )


def memory_bound(plan: Plan, cost: CostModel, costs: Optional[_Costs] = None) -> float:
    """A lower bound on the makespan of any run of `plan`'s generates on its devices that the simulator accepts
    (0 for an unplaced plan). It depends only on the generates' models and seconds, the devices' budgets and the
    models' footprints and load seconds, not on where the plan put anything.

    D devices with S compute streams each; W_m: seconds of all generates of model m, W = sum W_m; L_m: load
    seconds of m; L_min: the smallest L_m over models with generates. Call m *exclusive* when it cannot be
    resident beside any other model k with generates on any device: base + fp_m + fp_k + min(extra_m, extra_k)
    exceeds the largest device budget (fp: the smallest bytes any of its load steps reserves; extra: its load
    transient). The simulator checks that sum at the later of the two loads, so such a pair is never resident
    together. Argument, for a run of makespan T:
    1. A generate of m on device d needs m loaded there, and a load of m takes L_m >= L_min from t >= 0, so every
       device that runs generates has all S streams idle for [0, L_min).
    2. While exclusive m loads on d nothing else is resident on d, so no generate runs there: each load of an
       exclusive m leaves S x L_m of d's stream time idle, and two of them never overlap (both would be
       resident). A device with such a load already has its [0, first generate) idle counted only if it has
       none, so the idle stream time is >= S x (sum of exclusive loads x L_m + L_min x (devices used - devices
       with an exclusive load)) >= S x (sum_m r_m L_m + L_min x max(0, D_used - sum_m r_m)), r_m the loads of m.
    3. Every generate of m on d runs after a completed load of m there (started >= 0) and before T, so one load
       serves at most S x (T - L_m) seconds of m: r_m >= ceil(W_m / (S (T - L_m))) (and T > L_m).
    4. Busy plus idle stream time fits in D_used x S x T: D_used S T >= W + idle. Raising D_used by one adds S T
       on the left and at most S L_min < S T on the right, and fewer loads than (3) demands only lower the
       right side (L_m >= L_min), so a run of makespan T needs
           D S T >= W + S (sum_m r_m(T) L_m + L_min max(0, D - sum_m r_m(T))),  r_m(T) from (3).
    The right side never grows with T and the left does: bisection finds the boundary, and the largest T found
    to violate it is returned (strictly below any makespan a run can reach)."""
    costs = step_costs(plan, cost) if costs is None else costs
    devices, streams = len(plan.devices), max(1, plan.streams)
    if not devices:
        return 0.0
    work: dict[str, float] = {}
    reserved: dict[str, int] = {}
    for i, s in enumerate(plan.steps):
        if s.kind is StepKind.GENERATE:
            if s.where not in plan.devices:
                return 0.0  # a generate off the devices (not a placement this bound describes)
            work[s.model] = work.get(s.model, 0.0) + costs.seconds[i]
        elif s.kind is StepKind.LOAD:
            b = s.bytes or plan.footprints.get(s.model, 0)
            reserved[s.model] = min(reserved.get(s.model, b), b)
    if not work:
        return 0.0
    total = sum(work.values())
    load = {m: cost.load_seconds(m) for m in work}
    fp = {m: reserved.get(m, plan.footprints.get(m, 0)) for m in work}
    extra = {m: plan.load_extra.get(m, 0) for m in work}
    budgets = [b if plan.memory_budget is None else (plan.memory_budget if b is None else min(b, plan.memory_budget))
               for b in plan.devices.values()]
    exclusive: list[str] = []
    if all(b is not None for b in budgets) and len(work) > 1:
        largest = max(budgets)
        exclusive = [m for m in work if all(plan.base_bytes + fp[m] + fp[k] + min(extra[m], extra[k]) > largest
                                            for k in work if k != m)]
    l_min = min(load.values())

    def feasible(t: float) -> bool:
        loads = idle = 0.0
        for m in exclusive:
            if t <= load[m]:
                return False
            r = max(1, math.ceil(work[m] / (streams * (t - load[m])) - 1e-12))
            loads += r
            idle += r * load[m]
        idle += l_min * max(0.0, devices - loads)
        return devices * streams * t >= total + streams * idle

    lo = total / (devices * streams)  # the work bound: never feasible below it (idle >= 0)
    if feasible(lo):
        return lo
    hi = 2 * lo + max(load.values()) + 1.0
    while not feasible(hi):
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo


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
        # one device per step placement ("" = this process; a placed plan: each of plan.devices on its own,
        # processor sharing within a device only); memory: the base and the initial models are held throughout
        self.shared = shared and not plan.devices
        self.resident: dict[Slot, str] = {("", m): "loaded" for m in plan.initial}  # -> "loading" | "loaded"
        self.reserved_of: dict[Slot, int] = {("", m): plan.footprints.get(m, 0) for m in plan.initial}
        self.gens_of: dict[Slot, int] = {}
        wheres = list(plan.devices) or [""]
        self.reserved_on = {w: plan.base_bytes for w in wheres}
        self.used_on = {w: plan.base_bytes for w in wheres}
        self.reserved_on[""] = plan.base_bytes + sum(self.reserved_of.values())
        self.used_on[""] = plan.base_bytes + sum(cost.cost(m).weight_bytes for m in plan.initial)
        self.total_reserved = sum(self.reserved_on.values())
        self.peak_reserved, self.peak_used = max(self.reserved_on.values()), max(self.used_on.values())
        self.timeline: list[tuple[float, int]] = [(0.0, self.total_reserved)]
        # results
        self.busy: dict[int, float] = {s.stream: 0.0 for s in plan.steps}  # a cluster: the mean over devices
        self.per_stream = max(1, len(plan.devices))
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
        slot, w = (s.where, s.model), s.where
        state = self.resident.get(slot)
        on = f" on {w}" if w else ""
        if s.kind is StepKind.LOAD:
            if state is not None:
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: {s.model!r} is already resident{on}")
            self.resident[slot] = "loading"
            self.reserved_of[slot] = s.bytes or self.plan.footprints.get(s.model, 0)
            extra = self.plan.load_extra.get(s.model, 0)
            self._memory(w, self.reserved_of[slot] + extra, self.cost.cost(s.model).weight_bytes + extra)
            budget = self.plan.memory_budget
            if w and self.plan.devices.get(w) is not None:
                budget = self.plan.devices[w] if budget is None else min(budget, self.plan.devices[w])
            if budget is not None and self.reserved_on[w] > budget:
                here = ", ".join(m for where, m in self.resident if where == w)
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: {self.reserved_on[w]:,} bytes reserved{on} > "
                                    f"budget {budget:,} (resident: {here})")
        elif s.kind is StepKind.GENERATE:
            if state != "loaded":
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: generate on {s.model!r}{on}, which is "
                                    f"{'still loading' if state else 'not resident'}")
            self.gens_of[slot] = self.gens_of.get(slot, 0) + 1
            self.gens += 1
            self._memory(w, 0, self.costs.kv_bytes[i])
        elif s.kind is StepKind.EVICT:
            if state != "loaded":
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: evicting {s.model!r}{on}, which is "
                                    f"{'still loading' if state else 'not resident'}")
            if self.gens_of.get(slot):
                raise PlanViolation(f"{s.id} at t={self.now:.6g}s: evicting {s.model!r}{on} under a running batch")

    def _complete(self, i: int) -> None:
        s = self.plan.steps[i]
        self.walker.finish(s.id)
        start = self.start.pop(i)
        self.busy[s.stream] += (self.now - start) / self.per_stream
        self.spans.append(TraceSpan(s.id, s.stream, start, self.now, s.kind.value, s.model, s.nodes, s.where))
        slot, w = (s.where, s.model), s.where
        if s.kind is StepKind.LOAD:
            self.resident[slot] = "loaded"
            extra = self.plan.load_extra.get(s.model, 0)
            self._memory(w, -extra, -extra)
        elif s.kind is StepKind.GENERATE:
            self.gens_of[slot] -= 1
            self.gens -= 1
            self._memory(w, 0, -self.costs.kv_bytes[i])
        elif s.kind is StepKind.EVICT:
            del self.resident[slot]
            self._memory(w, -self.reserved_of.pop(slot), -self.cost.cost(s.model).weight_bytes)
        self._start_ready()

    def _memory(self, where: str, reserved: int, used: int) -> None:
        self.reserved_on[where] += reserved
        self.used_on[where] += used
        self.total_reserved += reserved
        self.peak_reserved = max(self.peak_reserved, self.reserved_on[where])
        self.peak_used = max(self.peak_used, self.used_on[where])
        if reserved:
            self.timeline.append((self.now, self.total_reserved))


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
