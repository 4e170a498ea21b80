"""`Plan.verify()`: the plan keeps the executor contract, whatever order an eager executor picks.

Checked: step ids unique and plan order topological; every node of the compiled graph answered exactly once
(model nodes by one generate step, host nodes by one host step, retrieve nodes by one retrieve step, fused-chain parts by their fused node's call),
on its own model when a cost model is given; each answering step depends directly on the steps answering its
nodes' parents; one model's generates share a compute stream, loads/evicts use the io stream, host steps the
host stream; and memory: replayed in plan order and in random linear extensions of the step DAG (orders an
eager dataflow executor may pick), every generate finds its model resident and the process never holds more
than the budget (runtime base + resident footprints + a load's transient); on a cluster, per device (each
device against its memory in `plan.devices`, every step on a device the plan knows, host steps local).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional, Sequence

from compiler.ir import NodeKind
from compiler.plan import ANSWERING, Step, StepKind

if TYPE_CHECKING:
    from compiler.plan import Plan


class PlanError(RuntimeError):
    """Lowering produced a plan that breaks the executor contract: a compiler bug, or a hand-edited plan."""


def verify_plan(plan: "Plan", cost: Any = None, orders: int = 3, seed: int = 0) -> None:
    index = _check_order(plan.steps)
    _check_coverage(plan, cost)
    _check_streams(plan)
    replay_memory(plan, plan.steps)
    rng = random.Random(seed)
    for _ in range(orders):
        replay_memory(plan, random_linear_extension(plan.steps, index, rng))


def _check_order(steps: Sequence[Step]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s.id in index:
            raise PlanError(f"duplicate step id {s.id!r}")
        for d in s.deps:
            if d not in index:
                raise PlanError(f"step {s.id!r} depends on {d!r}, which is not an earlier step of the plan")
        index[s.id] = i
    return index


def _check_coverage(plan: "Plan", cost: Any) -> None:
    graph = plan.graph
    if graph is None:
        return
    answered = Counter(n for s in plan.steps if s.kind in ANSWERING for n in s.nodes)
    twice = [n for n, c in answered.items() if c > 1]
    if twice:
        raise PlanError(f"node(s) answered by more than one step: {twice[:3]}")
    step_of = plan.step_of_node()
    by_id = {s.id: s for s in plan.steps}
    for node in graph:
        if node.part_of is not None:
            if node.id in answered:
                raise PlanError(f"part node {node.id!r} has a step of its own; its fused node answers it")
            continue
        sid = step_of.get(node.id)
        if sid is None:
            raise PlanError(f"node {node.id!r} is answered by no step")
        step = by_id[sid]
        want = StepKind.HOST if node.host is not None else \
            StepKind.RETRIEVE if node.kind is NodeKind.RETRIEVE else StepKind.GENERATE
        if step.kind is not want:
            raise PlanError(f"node {node.id!r} needs a {want.value} step, but {sid!r} is a {step.kind.value} step")
        if cost is not None and want is StepKind.GENERATE and cost.model_of(node) != step.model:
            raise PlanError(f"node {node.id!r} runs on {cost.model_of(node)!r}, but {sid!r} runs {step.model!r}")
        for parent in node.parents:
            if step_of.get(parent) not in step.deps:
                raise PlanError(f"{sid!r} answers {node.id!r} but does not depend on {step_of.get(parent)!r}, "
                                f"which answers its parent {parent!r}")
    unknown = [n for n in answered if n not in graph.nodes]
    if unknown:
        raise PlanError(f"step(s) name node(s) not in the graph: {unknown[:3]}")


def _check_streams(plan: "Plan") -> None:
    stream_of: dict[tuple[str, str], int] = {}
    for s in plan.steps:
        if s.node and s.where not in plan.devices:
            raise PlanError(f"{s.id!r} runs on device {s.where!r}, which is not one of the plan's devices "
                            f"({', '.join(plan.devices) or 'none: a local plan'})")
        if s.node and s.kind is StepKind.HOST:
            raise PlanError(f"{s.id!r}: host steps run in the coordinating process, not on {s.where!r}")
        if s.kind is StepKind.GENERATE:
            where = f" on {s.where}" if s.node else ""
            if stream_of.setdefault((s.model, s.where), s.stream) != s.stream or not 0 <= s.stream < plan.streams:
                raise PlanError(f"{s.id!r}: generates of {s.model!r}{where} must share one compute stream in "
                                f"0..{plan.streams - 1}")
        elif s.kind in (StepKind.HOST, StepKind.RETRIEVE) and s.stream != plan.host_stream:
            raise PlanError(f"{s.id!r}: {s.kind.value} steps run on stream {plan.host_stream}, not {s.stream}")
        elif s.kind in (StepKind.LOAD, StepKind.EVICT) and s.stream != plan.io_stream:
            raise PlanError(f"{s.id!r}: loads and evictions run on stream {plan.io_stream}, not {s.stream}")


def replay_memory(plan: "Plan", order: Sequence[Step]) -> int:
    """Replay residency in `order`; returns the peak bytes held (on the fullest device, on a cluster). Raises
    PlanError on any violation. On a cluster each device is replayed on its own, against its own memory."""
    lanes: dict[str, list[Step]] = {"": []} if not plan.devices else {}
    for s in order:
        if s.kind is not StepKind.HOST:
            lanes.setdefault(s.where, []).append(s)
    peak = 0
    for where, steps in lanes.items():
        budget = plan.memory_budget
        if where and plan.devices.get(where) is not None:
            budget = plan.devices[where] if budget is None else min(budget, plan.devices[where])
        peak = max(peak, _replay_device(plan, steps, budget, f" on {where}" if where else ""))
    return peak


def _replay_device(plan: "Plan", order: Sequence[Step], budget: Optional[int], on: str) -> int:
    resident = {m: plan.footprints.get(m, 0) for m in (plan.initial if not on else ())}
    held = plan.base_bytes + sum(resident.values())
    peak = held
    for s in order:
        during = held
        if s.kind is StepKind.LOAD:
            if s.model in resident:
                raise PlanError(f"{s.id}: {s.model!r} is loaded while already resident{on}")
            during = held + s.bytes + plan.load_extra.get(s.model, 0)
            resident[s.model] = s.bytes
            held += s.bytes
        elif s.kind is StepKind.EVICT:
            if s.model not in resident:
                raise PlanError(f"{s.id}: {s.model!r} is evicted while not resident{on}")
            held -= resident.pop(s.model)
        elif s.kind is StepKind.GENERATE and s.model not in resident:
            raise PlanError(f"{s.id}: generate on {s.model!r}, which is not resident{on}")
        peak = max(peak, during, held)
        if budget is not None and max(during, held) > budget:
            raise PlanError(f"at {s.id}: {max(during, held):,} bytes held{on} > budget {budget:,}")
    return peak


def random_linear_extension(steps: Sequence[Step], index: dict[str, int], rng: random.Random) -> list[Step]:
    """Any order an eager dataflow executor could pick: a random topological order of the step DAG."""
    waiting = [len(set(s.deps)) for s in steps]
    dependents: list[list[int]] = [[] for _ in steps]
    for i, s in enumerate(steps):
        for d in set(s.deps):
            dependents[index[d]].append(i)
    ready = [i for i, w in enumerate(waiting) if not w]
    order: list[Step] = []
    while ready:
        i = ready.pop(rng.randrange(len(ready)))
        order.append(steps[i])
        for j in dependents[i]:
            waiting[j] -= 1
            if not waiting[j]:
                ready.append(j)
    if len(order) != len(steps):
        raise PlanError("the step DAG has a cycle")
    return order
