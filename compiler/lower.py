"""Lowering: the scheduled graph -> a `Plan` of load / evict / generate steps with explicit dependencies.

Dependencies (each a one-line reason):
- generate -> the load of its model's current residency (weights must be there), and the generate
  steps of its nodes' parents (data);
- evict -> that residency's load and every generate run during it (never pull weights from under a
  batch), and the previous evict (evictions happen in planned order);
- load -> the latest evict before it in planned order.

Why that is enough for *any* execution order to stay within the budget: executed evictions are
always a prefix E1..Ek of the planned ones (they are chained), and a load can only have run if the
evict before it did, so every executed load lies before E(k+1) in planned order. What is resident is
therefore a subset of what the plan holds just before E(k+1), and the planner checked that this is
within budget (between two evictions the planned resident set only grows). Footprints include each
model's largest batch KV, and one model's generates share a stream, so running batches fit as well.

Without `level_schedule`, lowering falls back to the batches in their listed (level) order with LRU
eviction on demand: what a runtime without a residency plan would do, the ablation's baseline.
"""
from __future__ import annotations

from compiler.config import PassContext
from compiler.ir import Graph
from compiler.passes.batch import check_batches, make_batches
from compiler.passes.level_schedule import EVICT, LOAD, Schedule, build_schedule
from compiler.plan import Plan, Step, StepKind


def schedule_of(graph: Graph, ctx: PassContext) -> Schedule:
    """The graph's schedule, or the documented fallback when `level_schedule` did not run."""
    schedule = graph.annotations.get("schedule")
    if schedule is not None:
        return schedule
    batches = graph.annotations.get("batches") or make_batches(graph, ctx, max_size=1)
    return build_schedule(batches, list(range(len(batches))), ctx.cost, ctx.config.memory_budget, "lru")


def lower(graph: Graph, ctx: PassContext) -> Plan:
    schedule = schedule_of(graph, ctx)
    batches = schedule.batches
    check_batches(graph, batches, ctx.cost)
    cost, streams = ctx.cost, ctx.config.streams
    io_stream = streams

    steps: list[Step] = []
    counters: dict[tuple[str, str], int] = {}
    step_of_node: dict[str, str] = {}
    load_of: dict[str, str] = {}  # model -> its current residency's load step
    runs_of: dict[str, list[str]] = {}  # model -> generate steps during its current residency
    stream_of: dict[str, int] = {}  # model -> compute stream (first use order, round robin)
    last_evict: str | None = None

    def new_id(prefix: str, model: str) -> str:
        k = counters.get((prefix, model), 0)
        counters[(prefix, model)] = k + 1
        return f"{prefix}:{model}#{k}"

    for event in schedule.events:
        model = event.model
        if event.op == LOAD:
            sid = new_id("load", model)
            steps.append(Step(sid, StepKind.LOAD, model, (), (last_evict,) if last_evict else (), io_stream,
                              cost.load_seconds(model), schedule.footprints[model]))
            load_of[model], runs_of[model] = sid, []
        elif event.op == EVICT:
            sid = new_id("evict", model)
            deps = [load_of.pop(model), *runs_of.pop(model)]
            if last_evict:
                deps.append(last_evict)
            steps.append(Step(sid, StepKind.EVICT, model, (), tuple(deps), io_stream, 0.0,
                              schedule.footprints[model]))
            last_evict = sid
        else:
            b = batches[event.batch]
            sid = new_id("gen", model)
            deps = {load_of[model]: None}  # dict as an ordered set: deterministic dep order
            for nid in b.nodes:
                for parent in graph.nodes[nid].parents:
                    deps[step_of_node[parent]] = None
            stream = stream_of.setdefault(model, len(stream_of) % streams)
            steps.append(Step(sid, StepKind.GENERATE, model, b.nodes, tuple(deps), stream, b.est_s, b.kv_bytes,
                              b.slots))
            runs_of[model].append(sid)
            for nid in b.nodes:
                step_of_node[nid] = sid
                for part in graph.nodes[nid].fused_from[:-1]:  # parts are answered by this same call
                    step_of_node[part] = sid

    return Plan(steps, ctx.config.memory_budget, dict(schedule.footprints), streams, schedule.eviction,
                dict(graph.annotations.get("aliases", {})), graph)
