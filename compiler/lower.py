"""Lowering: the batched, scheduled, residency-planned graph -> a `Plan` of steps with explicit dependencies.

Lowering only lowers: it requires the `batches`, `schedule` and `residency` annotations (the pass manager
refuses a pipeline that does not provide them) and decides nothing those passes did not. Online, each plan
increment is lowered by the same `Lowering`, which remembers what earlier increments issued (step ids, who
answers which node, each resident model's load and generates, the last eviction), so an increment's steps
depend on earlier steps exactly as if they had been lowered together; issued steps never change.

Dependencies (each a one-line reason):
- generate -> the load of its model's current residency (weights must be there; none for a model resident
  from the start), and the steps answering its nodes' parents (data); online, a call of a model whose
  reservation grew in this increment also waits for the last eviction issued before it;
- host -> the steps answering its nodes' parents (data); it is emitted right after the last of them;
- retrieve (a `retrieve` pass lookup) -> the steps answering its nodes' parents (data), emitted like a host step
  as soon as the last of them is, on the host stream; its nodes' readers depend on it like on any parent;
- evict -> that residency's load and every generate run during it (never pull weights from under a
  batch), and the previous evict (evictions happen in planned order);
- load -> the latest evict before it in planned order.

On a cluster (a `placement` annotation) all of this holds per device: residency events carry their device,
loads/evicts/generates name it (`Step.node`, `Step.device`), evictions chain per device, and the argument below
holds for each device's memory separately.

Why that is enough for *any* execution order to stay within the budget: executed evictions are
always a prefix E1..Ek of the planned ones (they are chained), and a load can only have run if the
evict before it did, so every executed load lies before E(k+1) in planned order. What is resident is
therefore a subset of what the plan holds just before E(k+1), and the residency pass checked that this is
within budget (between two evictions the planned resident set only grows, and a load's transient was
checked against what was resident when it runs). Footprints include each model's largest call, and one
model's generates share a stream, so running calls fit as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from compiler.config import PassContext
from compiler.errors import CompileError
from compiler.ir import Graph, NodeKind
from compiler.passes.batch import check_batches
from compiler.passes.residency import Op
from compiler.passes.retrieve import check_lookups
from compiler.plan import Plan, Step, StepKind

Key = tuple[str, int]  # (model, device position; -1 = this process)


@dataclass
class Lowering:
    """Lowering's memory of the steps issued so far (one instance per plan, fed increment by increment)."""

    # Residency state is per (model, device): device is the position in the placement, -1 = this process.
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    step_of_node: dict[str, str] = field(default_factory=dict)  # node id -> the step that answers it
    load_of: dict[Key, str | None] = field(default_factory=dict)  # resident model -> its load (None: from start)
    runs_of: dict[Key, list[str]] = field(default_factory=dict)  # resident model -> generates since its load
    stream_of: dict[Key, int] = field(default_factory=dict)  # model -> compute stream (first use, round robin)
    reserved: dict[str, int] = field(default_factory=dict)  # resident model -> bytes reserved (this process)
    reserved_on: dict[Key, int] = field(default_factory=dict)  # the same on a cluster's devices
    evicts: dict[int, str] = field(default_factory=dict)  # device -> its latest evict (evictions chain per device)
    streams_used: dict[int, int] = field(default_factory=dict)  # device -> compute streams handed out

    @property
    def last_evict(self) -> str | None:
        return self.evicts.get(-1)

    def lower(self, graph: Graph, ctx: PassContext) -> Plan:
        """The steps for every node of `graph` not answered yet, as a plan (all of it, or the next increment)."""
        batches = graph.annotations["batches"]
        residency = graph.annotations["residency"]
        check_batches(graph, batches, ctx.cost, ctx.done)
        streams = ctx.config.streams
        io_stream, host_stream = streams, streams + 1
        steps: list[Step] = []
        evicted_before = self.last_evict  # a grown reservation is only there once earlier evictions ran
        placement = graph.annotations.get("placement")
        where = {-1: ("", 0)}  # device position -> (cluster node, device index) written into the steps
        if placement is not None:
            where.update({i: (d.node, d.index) for i, d in enumerate(placement.devices)})
        for model in residency.initial:
            self.load_of.setdefault((model, -1), None)
            self.runs_of.setdefault((model, -1), [])
            self.reserved[model] = residency.footprints[model]

        lookups = graph.annotations.get("retrievals")
        if lookups is None and any(n.kind is NodeKind.RETRIEVE and n.id not in ctx.done for n in graph):
            raise CompileError("the graph has retrieve nodes but no pass grouped them into lookups: add `retrieve` "
                               "to compiler.passes (before batch)")
        lookups = lookups or ()
        check_lookups(graph, lookups, ctx.done)
        # host nodes and lookups are emitted as soon as every parent is answered: count what each still waits for
        # (a unit is a host node's id, or "@k" for lookup k)
        members = {nid: (node.parents,) for nid, node in graph.nodes.items()
                   if node.host is not None and nid not in self.step_of_node}
        lookup_of = {f"@{lk.index}": lk for lk in lookups}
        members.update({unit: tuple(graph.nodes[n].parents for n in lk.nodes) for unit, lk in lookup_of.items()})
        missing: dict[str, int] = {}
        waiting_on: dict[str, list[str]] = {}
        ready: list[str] = []
        for unit, parent_lists in members.items():
            open_parents = list(dict.fromkeys(p for parents in parent_lists for p in parents
                                              if p not in self.step_of_node))
            missing[unit] = len(open_parents)
            for parent in open_parents:
                waiting_on.setdefault(parent, []).append(unit)
            if not open_parents:
                ready.append(unit)

        def answered(nids: list[str], sid: str) -> None:
            """Record who answers `nids`; a host node whose last parent this was follows right behind."""
            now_ready = []
            for nid in nids:
                self.step_of_node[nid] = sid
                for host in waiting_on.get(nid, ()):
                    missing[host] -= 1
                    if not missing[host]:
                        now_ready.append(host)
            emit_hosts(now_ready)

        def emit_hosts(units: list[str]) -> None:
            for unit in units:
                if unit in lookup_of:
                    lk = lookup_of[unit]
                    sid = self._new_id("retrieve", lk.source)
                    deps = tuple(dict.fromkeys(self.step_of_node[p] for n in lk.nodes for p in graph.nodes[n].parents))
                    steps.append(Step(sid, StepKind.RETRIEVE, "", lk.nodes, deps, host_stream, lk.est_s))
                    answered(list(lk.nodes), sid)
                    continue
                deps = tuple(dict.fromkeys(self.step_of_node[p] for p in graph.nodes[unit].parents))
                steps.append(Step(f"host:{unit}", StepKind.HOST, "", (unit,), deps, host_stream))
                answered([unit], f"host:{unit}")

        emit_hosts(ready)  # nothing (more) to wait for
        for event in residency.events:
            model, dev = event.model, event.device
            key = (model, dev)
            node, index = where[dev]
            last_evict = self.evicts.get(dev)
            if event.op is Op.LOAD:
                sid = self._new_id("load", model)
                deps = (last_evict,) if last_evict else ()
                steps.append(Step(sid, StepKind.LOAD, model, (), deps, io_stream, ctx.cost.load_seconds(model),
                                  residency.footprints[model], node=node, device=index))
                self.load_of[key], self.runs_of[key] = sid, []
                self._reserved(dev)[key if dev >= 0 else model] = residency.footprints[model]
            elif event.op is Op.EVICT:
                sid = self._new_id("evict", model)
                load = self.load_of.pop(key)
                deps = ([load] if load else []) + self.runs_of.pop(key) + ([last_evict] if last_evict else [])
                steps.append(Step(sid, StepKind.EVICT, model, (), tuple(deps), io_stream, 0.0, self._reserved(dev).pop(key if dev >= 0 else model),
                                  node=node, device=index))
                self.evicts[dev] = sid
            else:
                b = batches[event.batch]
                sid = self._new_id("gen", model)
                deps = {self.load_of[key]: None} if self.load_of[key] else {}  # ordered set: deterministic
                if model in residency.grown and evicted_before and dev < 0:
                    deps[evicted_before] = None
                for nid in b.nodes:
                    for parent in graph.nodes[nid].parents:
                        if parent not in self.step_of_node:
                            raise CompileError(f"{sid}: node {nid!r} reads {parent!r}, which no earlier step answers "
                                               "(the schedule runs a reader before its lookup)")
                        deps[self.step_of_node[parent]] = None
                if key not in self.stream_of:  # round robin over the device's compute streams, by first use
                    used = self.streams_used.get(dev, 0)
                    self.stream_of[key], self.streams_used[dev] = used % streams, used + 1
                stream = self.stream_of[key]
                steps.append(Step(sid, StepKind.GENERATE, model, b.nodes, tuple(deps), stream, b.est_s, b.bytes,
                                  b.slots, node=node, device=index, prefill_saved=b.prefill_saved))
                self.runs_of[key].append(sid)
                parts = [p for nid in b.nodes for p in graph.nodes[nid].fused_from[:-1]]  # answered by this call
                answered([*b.nodes, *parts], sid)

        devices = {} if placement is None else {d.key: d.memory for d in placement.devices}
        return Plan(steps, ctx.config.memory_budget, dict(residency.footprints), streams, residency.policy.value,
                    dict(graph.annotations.get("aliases", {})), graph, ctx.cost.base_bytes,
                    {m: b for m, b in residency.load_extra.items() if b}, residency.initial, devices=devices,
                    engines={m: ctx.cost.engine(m).describe() for m in ctx.cost.engines if m in residency.footprints})

    def _reserved(self, dev: int) -> dict:
        return self.reserved_on if dev >= 0 else self.reserved

    def _new_id(self, prefix: str, model: str) -> str:
        k = self.counters.get((prefix, model), 0)
        self.counters[(prefix, model)] = k + 1
        return f"{prefix}:{model}#{k}"


def lower(graph: Graph, ctx: PassContext) -> Plan:
    """A whole plan in one go (batch compilation)."""
    return Lowering().lower(graph, ctx)
