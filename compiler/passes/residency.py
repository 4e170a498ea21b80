"""`residency`: which models are resident when, along the planned order, never above the memory budget.

A model occupies its *footprint* while resident: weights in their compute dtype plus its largest call (KV and
prefill workspace, reserved, so calls of resident models on different streams can never overflow together).
Loading also holds the model's load transient (`ModelCost.load_extra_bytes`) until the load ends, and the
runtime's base (`CostModel.base_bytes`) is held throughout, so the budget bounds what the process really
holds. Models already loaded when the plan starts (`PassContext.resident`) begin resident; in online
compilation a model's reservation from earlier increments may have to grow for this increment's larger calls
(`Residency.grown`: lowering makes those calls wait for the earlier increments' evictions). Loads happen on
demand; when the budget is short, the victim is the resident model whose next use in the planned order is
furthest away (`belady`: Belady/MIN, known exactly because the graph is known; optimal in the number of loads
for equal footprints, a heuristic otherwise), or the least recently used one (`lru`, the baseline). A model
that cannot fit at all is a `MemoryBudgetError`.
Output: `annotations["residency"]`, a `Residency`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional

from compiler.config import PassContext, ResidencyPolicy
from compiler.cost import CostModel
from compiler.errors import MemoryBudgetError
from compiler.ir import Graph
from compiler.passes.batch import Batch
from compiler.passes.registry import Pass, register


class Op(str, Enum):
    LOAD = "load"
    EVICT = "evict"
    RUN = "run"


@dataclass(frozen=True)
class Event:
    """One entry of the planned sequence: load/evict a model, or run batch `batch`."""

    op: Op
    model: str
    batch: int = -1
    device: int = -1  # on a cluster: the position of the device in the placement; -1 = this process


@dataclass(frozen=True)
class Residency:
    events: tuple[Event, ...]  # loads, evictions and runs in planned order
    footprints: dict[str, int]  # model -> bytes reserved while resident
    load_extra: dict[str, int]  # model -> bytes held only while it loads
    initial: tuple[str, ...]  # models resident when the plan starts (no load event)
    policy: ResidencyPolicy
    grown: frozenset[str] = frozenset()  # initial models whose earlier reservation grows for this plan's calls

    @property
    def loads(self) -> int:
        return sum(1 for e in self.events if e.op is Op.LOAD)

    @property
    def evictions(self) -> int:
        return sum(1 for e in self.events if e.op is Op.EVICT)

    def dump(self) -> str:
        lines = [f"residency policy={self.policy.value} loads={self.loads} evictions={self.evictions}"
                 + (f" initially resident: {', '.join(self.initial)}" if self.initial else "")]
        lines += [f"  footprint {m}={b}" for m, b in self.footprints.items()]
        lines += [f"  {e.op.value} {e.model}" + (f" batch {e.batch}" if e.op is Op.RUN else "")
                  + (f" on device {e.device}" if e.device >= 0 else "") for e in self.events]
        return "\n".join(lines)


def residency(graph: Graph, ctx: PassContext) -> Graph:
    batches = graph.annotations["batches"]
    order = graph.annotations["schedule"].order
    out = graph.copy()
    placement = graph.annotations.get("placement")
    if placement is None:
        out.annotations["residency"] = build_residency(batches, order, ctx.cost, ctx.config.planning_budget,
                                                       ctx.config.residency, ctx.resident)
    else:
        out.annotations["residency"] = build_device_residency(batches, placement.order or order, ctx.cost,
                                                              placement, ctx.config.residency)
    return out


def build_device_residency(batches: tuple[Batch, ...], order: tuple[int, ...], cost: CostModel, placement,
                           policy: ResidencyPolicy) -> Residency:
    """On a cluster: Belady (or LRU) on every device separately, over the calls placed on it in planned order,
    under that device's budget; the per-device events are merged back into one planned order (each device's
    events up to a call come right before that call). Nothing starts resident on a cluster."""
    sizes = footprints(batches, cost)
    extra = {m: cost.cost(m).load_extra_bytes for m in sizes}
    per_device: dict[int, list[int]] = {}
    for i in order:
        per_device.setdefault(placement.batch_device[i], []).append(i)
    queues: dict[int, list[Event]] = {}
    for d, idx in per_device.items():
        budget = placement.budgets[d]
        capacity = math.inf if budget is None else budget - cost.base_bytes
        events = plan_residency([batches[i].model for i in idx], sizes, extra, capacity, policy)
        queues[d] = [Event(e.op, e.model, idx[e.batch] if e.op is Op.RUN else -1, d) for e in events]
    cursor = {d: 0 for d in queues}
    merged: list[Event] = []
    for i in order:
        d = placement.batch_device[i]
        q = queues[d]
        while True:
            e = q[cursor[d]]
            cursor[d] += 1
            merged.append(e)
            if e.op is Op.RUN:
                break
    for d, q in queues.items():  # evictions after a device's last call (none today; kept for completeness)
        merged.extend(q[cursor[d]:])
    return Residency(tuple(merged), sizes, extra, (), policy)


def footprints(batches: tuple[Batch, ...], cost: CostModel, resident: Mapping[str, int] = {}) -> dict[str, int]:
    """Bytes each model holds while resident: weights + its largest call, and never less than what earlier
    increments already reserved for it (resident-only models: weights, or that reservation)."""
    held: dict[str, int] = {m: 0 for m in resident}
    for b in batches:
        held[b.model] = max(held.get(b.model, 0), b.bytes)
    return {m: max(cost.cost(m).weight_bytes + k, resident.get(m, 0)) for m, k in held.items()}


def build_residency(batches: tuple[Batch, ...], order: tuple[int, ...], cost: CostModel, budget: Optional[int],
                    policy: ResidencyPolicy, resident: Mapping[str, int] = {}) -> Residency:
    initial = tuple(resident)
    sizes = footprints(batches, cost, resident)
    grown = frozenset(m for m, reserved in resident.items() if reserved and sizes[m] > reserved)
    extra = {m: cost.cost(m).load_extra_bytes for m in sizes}
    if budget is not None:
        for model, size in sizes.items():
            need = cost.base_bytes + size + (0 if model in initial else extra[model])
            if need > budget:
                weights = cost.cost(model).weight_bytes
                raise MemoryBudgetError(model, need, budget,
                                        f"runtime base {cost.base_bytes:,} + weights {weights:,} + its largest "
                                        f"call {size - weights:,} + load transient {need - size - cost.base_bytes:,}")
    capacity = math.inf if budget is None else budget - cost.base_bytes
    events = plan_residency([batches[i].model for i in order], sizes, extra, capacity, policy, initial)
    # plan_residency returns runs as positions in `order`; turn them back into batch indices
    events = tuple(Event(e.op, e.model, order[e.batch]) if e.op is Op.RUN else e for e in events)
    return Residency(events, sizes, extra, initial, policy, grown)


def plan_residency(uses: list[str], sizes: dict[str, int], extra: dict[str, int], capacity: float,
                   policy: ResidencyPolicy, initial: tuple[str, ...] = ()) -> list[Event]:
    """Loads/evictions for the model sequence `uses`: resident footprints, plus a loading model's transient,
    never exceed `capacity`.

    Linear in len(uses) times the number of resident models (a handful): next uses are precomputed
    per model, and the victim search scans only the resident set.
    """
    positions: dict[str, list[int]] = {m: [] for m in initial}
    for t, model in enumerate(uses):
        positions.setdefault(model, []).append(t)
    cursor = {m: 0 for m in positions}  # index into positions[m] of m's next use at or after now
    resident: dict[str, int] = {m: -1 for m in initial}  # model -> last use (insertion-ordered scans)
    used = sum(sizes[m] for m in initial)
    events: list[Event] = []
    for t, model in enumerate(uses):
        cursor[model] += 1
        if model not in resident:
            need = sizes[model] + extra.get(model, 0)
            if need > capacity:
                raise MemoryBudgetError(model, int(need), int(capacity))
            while used + need > capacity:
                victim = _victim(resident, positions, cursor, sizes, policy)
                events.append(Event(Op.EVICT, victim))
                used -= sizes[victim]
                del resident[victim]
            events.append(Event(Op.LOAD, model))
            used += sizes[model]
        resident[model] = t
        events.append(Event(Op.RUN, model, t))
    return events


def _victim(resident: dict[str, int], positions: dict[str, list[int]], cursor: dict[str, int],
            sizes: dict[str, int], policy: ResidencyPolicy) -> str:
    if policy is ResidencyPolicy.lru:
        return min(resident, key=lambda m: resident[m])

    def next_use(m: str) -> float:
        i = cursor[m]
        return positions[m][i] if i < len(positions[m]) else math.inf

    # furthest next use; among models never used again, the largest first (fewer eviction steps)
    return max(resident, key=lambda m: (next_use(m), sizes[m] if next_use(m) == math.inf else 0))


register(Pass("residency", residency, requires=frozenset({"batches", "schedule"}),
              provides=frozenset({"residency"})))
