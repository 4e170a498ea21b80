"""`schedule`: the planned order of the calls (the `batch` pass's batches), decided once, before residency.

Level by level (levels are where batches come from); inside a level, one model's batches run back to back,
and the level starts with the model the previous level ended on (at the start: a model already resident), so
adjacent levels share a model instead of swapping (A B | B A | A B ...). The order does not depend on the
residency policy, so Belady and LRU are compared on the same sequence (the tinygrad split of
`create_schedule` from `memory_planner`).
Output: `annotations["schedule"]`, a `Schedule` (batch indices in planned order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from compiler.config import PassContext
from compiler.ir import Graph
from compiler.passes.batch import Batch, check_batches
from compiler.passes.registry import Pass, register


@dataclass(frozen=True)
class Schedule:
    order: tuple[int, ...]  # batch indices, in the order the calls are planned to run

    def dump(self) -> str:
        return "schedule: batches " + " ".join(map(str, self.order))


def schedule(graph: Graph, ctx: PassContext) -> Graph:
    batches = graph.annotations["batches"]
    check_batches(graph, batches, ctx.cost, ctx.done)
    out = graph.copy()
    out.annotations["schedule"] = Schedule(tuple(order_batches(batches, ctx.resident)))
    return out


def order_batches(batches: tuple[Batch, ...], resident: Iterable[str] = ()) -> list[int]:
    """Level by level; per level one model at a time, starting with the model the last level ended on."""
    by_level: dict[int, dict[str, list[int]]] = {}
    for b in batches:
        by_level.setdefault(b.level, {}).setdefault(b.model, []).append(b.index)
    order: list[int] = []
    current: Optional[str] = next(iter(resident), None)
    for level in sorted(by_level):
        models = by_level[level]
        first = [current] if current in models else []
        for model in first + [m for m in models if m != current]:
            order.extend(models[model])
            current = model
    return order


register(Pass("schedule", schedule, requires=frozenset({"batches"}), provides=frozenset({"schedule"})))
