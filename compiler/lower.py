"""Lowering: the batched, scheduled, residency-planned graph -> a `Plan` of steps with explicit dependencies.

Lowering only lowers: it requires the `batches`, `schedule` and `residency` annotations (the pass manager
refuses a pipeline that does not provide them) and decides nothing those passes did not.

Dependencies (each a one-line reason):
- generate -> the load of its model's current residency (weights must be there; none for a model resident
  from the start), and the steps answering its nodes' parents (data);
- host -> the steps answering its nodes' parents (data); it is emitted right after the last of them;
- evict -> that residency's load and every generate run during it (never pull weights from under a
  batch), and the previous evict (evictions happen in planned order);
- load -> the latest evict before it in planned order.

Why that is enough for *any* execution order to stay within the budget: executed evictions are
always a prefix E1..Ek of the planned ones (they are chained), and a load can only have run if the
evict before it did, so every executed load lies before E(k+1) in planned order. What is resident is
therefore a subset of what the plan holds just before E(k+1), and the residency pass checked that this is
within budget (between two evictions the planned resident set only grows, and a load's transient was
checked against what was resident when it runs). Footprints include each model's largest call, and one
model's generates share a stream, so running calls fit as well.
"""
from __future__ import annotations

from compiler.config import PassContext
from compiler.ir import Graph
from compiler.passes.batch import check_batches
from compiler.passes.residency import Op
from compiler.plan import Plan, Step, StepKind


def lower(graph: Graph, ctx: PassContext) -> Plan:
    batches = graph.annotations["batches"]
    residency = graph.annotations["residency"]
    check_batches(graph, batches, ctx.cost)
    streams = ctx.config.streams
    io_stream, host_stream = streams, streams + 1

    steps: list[Step] = []
    counters: dict[tuple[str, str], int] = {}
    step_of_node: dict[str, str] = {}
    load_of: dict[str, str | None] = {m: None for m in residency.initial}  # model -> its residency's load step
    runs_of: dict[str, list[str]] = {m: [] for m in residency.initial}  # model -> generates in that residency
    stream_of: dict[str, int] = {}  # model -> compute stream (first use order, round robin)
    last_evict: str | None = None
    # host nodes are emitted as soon as every parent is answered: count what each still waits for
    missing: dict[str, int] = {}
    waiting_on: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        if node.host is not None:
            missing[node.id] = len(node.parents)
            for parent in node.parents:
                waiting_on.setdefault(parent, []).append(node.id)

    def new_id(prefix: str, model: str) -> str:
        k = counters.get((prefix, model), 0)
        counters[(prefix, model)] = k + 1
        return f"{prefix}:{model}#{k}"

    def answered(nids: list[str], sid: str) -> None:
        """Record who answers `nids`; a host node whose last parent this was follows right behind."""
        ready = []
        for nid in nids:
            step_of_node[nid] = sid
            for host in waiting_on.get(nid, ()):
                missing[host] -= 1
                if not missing[host]:
                    ready.append(host)
        for host in ready:
            deps = tuple(dict.fromkeys(step_of_node[p] for p in graph.nodes[host].parents))
            steps.append(Step(f"host:{host}", StepKind.HOST, "", (host,), deps, host_stream))
            answered([host], f"host:{host}")

    for node in graph.nodes.values():
        if node.host is not None and not node.parents:  # nothing to wait for
            steps.append(Step(f"host:{node.id}", StepKind.HOST, "", (node.id,), (), host_stream))
            answered([node.id], f"host:{node.id}")
    for event in residency.events:
        model = event.model
        if event.op is Op.LOAD:
            sid = new_id("load", model)
            steps.append(Step(sid, StepKind.LOAD, model, (), (last_evict,) if last_evict else (), io_stream,
                              ctx.cost.load_seconds(model), residency.footprints[model]))
            load_of[model], runs_of[model] = sid, []
        elif event.op is Op.EVICT:
            sid = new_id("evict", model)
            load = load_of.pop(model)
            deps = ([load] if load else []) + runs_of.pop(model) + ([last_evict] if last_evict else [])
            steps.append(Step(sid, StepKind.EVICT, model, (), tuple(deps), io_stream, 0.0,
                              residency.footprints[model]))
            last_evict = sid
        else:
            b = batches[event.batch]
            sid = new_id("gen", model)
            deps = {load_of[model]: None} if load_of[model] else {}  # dict as an ordered set: deterministic
            for nid in b.nodes:
                for parent in graph.nodes[nid].parents:
                    deps[step_of_node[parent]] = None
            stream = stream_of.setdefault(model, len(stream_of) % streams)
            steps.append(Step(sid, StepKind.GENERATE, model, b.nodes, tuple(deps), stream, b.est_s, b.bytes,
                              b.slots))
            runs_of[model].append(sid)
            parts = [p for nid in b.nodes for p in graph.nodes[nid].fused_from[:-1]]  # answered by this call too
            answered([*b.nodes, *parts], sid)

    return Plan(steps, ctx.config.memory_budget, dict(residency.footprints), streams, residency.policy.value,
                dict(graph.annotations.get("aliases", {})), graph, ctx.cost.base_bytes,
                {m: b for m, b in residency.load_extra.items() if b}, residency.initial)
