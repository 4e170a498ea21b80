"""`level_schedule`: the planned order of batches and which models are resident when.

Order: level by level (levels are where batches come from); inside a level, one model's batches run
back to back, and the level starts with the model the previous level ended on, so adjacent levels
share a model instead of swapping (A B | B A | A B ...). The order does not depend on the eviction
policy, so Belady and LRU are compared on the same sequence.

Residency: a model occupies its *footprint* while resident: weights plus the KV of its largest batch
(reserved, so batches of resident models on different streams can never overflow together). Loads
happen on demand; when the budget is short, the victim is the resident model whose next use in the
planned order is furthest away (Belady/MIN, known exactly because the graph is known; optimal in
the number of loads for equal footprints, a heuristic otherwise), or the least recently used one for
`eviction="lru"`. A model whose footprint exceeds the budget is a `MemoryBudgetError`.
Output: `annotations["schedule"]`, a `Schedule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from compiler.config import PassContext
from compiler.cost import CostModel
from compiler.errors import MemoryBudgetError
from compiler.ir import Graph
from compiler.passes import register
from compiler.passes.batch import Batch, check_batches, make_batches

LOAD, EVICT, RUN = "load", "evict", "run"


@dataclass(frozen=True)
class Event:
    """One entry of the planned sequence: load/evict a model, or run batch `batch`."""

    op: str
    model: str
    batch: int = -1


@dataclass(frozen=True)
class Schedule:
    batches: tuple[Batch, ...]
    events: tuple[Event, ...]  # loads, evictions and runs in planned order
    footprints: dict[str, int]  # model -> bytes reserved while resident
    eviction: str

    @property
    def loads(self) -> int:
        return sum(1 for e in self.events if e.op == LOAD)

    @property
    def evictions(self) -> int:
        return sum(1 for e in self.events if e.op == EVICT)

    def dump(self) -> str:
        lines = [f"schedule eviction={self.eviction} loads={self.loads} evictions={self.evictions}"]
        lines += [f"  footprint {m}={b}" for m, b in self.footprints.items()]
        lines += [f"  {e.op} {e.model}" + (f" batch {e.batch}" if e.op == RUN else "") for e in self.events]
        return "\n".join(lines)


@register("level_schedule")
def level_schedule(graph: Graph, ctx: PassContext) -> Graph:
    batches = graph.annotations.get("batches")
    if batches is None:  # `batch` is off: every node is its own call
        batches = make_batches(graph, ctx, max_size=1)
    else:
        check_batches(graph, batches, ctx.cost)
    out = graph.copy()
    out.annotations["schedule"] = build_schedule(batches, order_batches(batches), ctx.cost,
                                                 ctx.config.memory_budget, ctx.config.eviction)
    return out


def order_batches(batches: tuple[Batch, ...]) -> list[int]:
    """Level by level; per level one model at a time, starting with the model the last level ended on."""
    by_level: dict[int, dict[str, list[int]]] = {}
    for b in batches:
        by_level.setdefault(b.level, {}).setdefault(b.model, []).append(b.index)
    order: list[int] = []
    current: Optional[str] = None
    for level in sorted(by_level):
        models = by_level[level]
        first = [current] if current in models else []
        for model in first + [m for m in models if m != current]:
            order.extend(models[model])
            current = model
    return order


def footprints(batches: tuple[Batch, ...], cost: CostModel) -> dict[str, int]:
    """Bytes each model holds while resident: weights + KV of its largest batch."""
    kv: dict[str, int] = {}
    for b in batches:
        kv[b.model] = max(kv.get(b.model, 0), b.kv_bytes)
    return {m: cost.cost(m).weight_bytes + k for m, k in kv.items()}


def build_schedule(batches: tuple[Batch, ...], order: list[int], cost: CostModel, budget: Optional[int],
                   eviction: str) -> Schedule:
    sizes = footprints(batches, cost)
    if budget is not None:
        for model, size in sizes.items():
            if size > budget:
                weights = cost.cost(model).weight_bytes
                raise MemoryBudgetError(model, size, budget,
                                        f"weights {weights:,} + KV {size - weights:,} for its largest batch")
    events = plan_residency([batches[i].model for i in order], sizes, budget, eviction)
    # plan_residency returns runs as positions in `order`; turn them back into batch indices
    events = tuple(Event(e.op, e.model, order[e.batch]) if e.op == RUN else e for e in events)
    return Schedule(tuple(batches), events, sizes, eviction)


def plan_residency(uses: list[str], sizes: dict[str, int], budget: Optional[int], eviction: str) -> list[Event]:
    """Loads/evictions for the model sequence `uses`, never holding more than `budget` bytes.

    Linear in len(uses) times the number of resident models (a handful): next uses are precomputed
    per model, and the victim search scans only the resident set.
    """
    capacity = math.inf if budget is None else budget
    positions: dict[str, list[int]] = {}
    for t, model in enumerate(uses):
        positions.setdefault(model, []).append(t)
    cursor = {m: 0 for m in positions}  # index into positions[m] of m's next use at or after now
    resident: dict[str, int] = {}  # model -> last use (insertion-ordered: deterministic scans)
    used = 0
    events: list[Event] = []
    for t, model in enumerate(uses):
        cursor[model] += 1
        if model not in resident:
            if sizes[model] > capacity:
                raise MemoryBudgetError(model, sizes[model], int(capacity))
            while used + sizes[model] > capacity:
                victim = _victim(resident, positions, cursor, sizes, eviction)
                events.append(Event(EVICT, victim))
                used -= sizes[victim]
                del resident[victim]
            events.append(Event(LOAD, model))
            used += sizes[model]
        resident[model] = t
        events.append(Event(RUN, model, t))
    return events


def _victim(resident: dict[str, int], positions: dict[str, list[int]], cursor: dict[str, int],
            sizes: dict[str, int], eviction: str) -> str:
    if eviction == "lru":
        return min(resident, key=lambda m: resident[m])

    def next_use(m: str) -> float:
        i = cursor[m]
        return positions[m][i] if i < len(positions[m]) else math.inf

    # furthest next use; among models never used again, the largest first (fewer eviction steps)
    return max(resident, key=lambda m: (next_use(m), sizes[m] if next_use(m) == math.inf else 0))
