"""`place`: on a cluster, which devices hold which model, how many replicas each gets, and which replica runs
each call (the `batch` pass's batches). On the local process (`cluster=local`, no nodes) it does nothing.

Why the compiler: it knows every call of every model before anything runs (the graph), so it can size replicas
by demand instead of guessing, and spread one model's calls over its replicas by when they can start.

Policies (`compiler.placement`):
- `demand` (default): demand per model = the cost model's seconds of all its calls. Each model gets replicas
  in proportion (enough that none carries more than half a device's fair share of the total work, at most one
  per device), packed largest-share-first onto the least-loaded device that still has memory for it (weights +
  its largest call, under the device's memory less headroom). Then every call, in the scheduled order, goes to
  the replica that is estimated to finish it first: its start waits for its parents' calls (critical-path
  slack: a call whose inputs come late does not block a replica that could run other work), for its replica's
  load and for what that device runs before it (earliest-finish-time list scheduling over the cost model).
- `one_per_expert`: one replica per model, packed the same way (no replication), calls on that replica.
- `round_robin`: the naive baseline: models in first-use order on device 0, 1, 2, ... (the next device with
  room when one is full), one replica each.
A model whose footprint fits no device at all is a `MemoryBudgetError` naming the largest device. If the
replicas a policy must place cannot all stay resident on a device, `residency` swaps them there (Belady).
Output: `annotations["placement"]`, a `Placement`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from compiler.cluster import Device, PlacementPolicy
from compiler.config import PassContext
from compiler.errors import MemoryBudgetError
from compiler.ir import Graph
from compiler.passes.batch import Batch
from compiler.passes.registry import Pass, register
from compiler.passes.residency import footprints

#: Each model gets enough replicas that one carries at most this share of a device's fair share of all work.
REPLICA_SHARE = 0.5


@dataclass(frozen=True)
class Placement:
    policy: PlacementPolicy
    devices: tuple[Device, ...]
    budgets: tuple[Optional[int], ...]  # per device: the bytes plans fit into (memory less headroom)
    replicas: dict[str, tuple[int, ...]]  # model -> device positions holding a replica
    batch_device: tuple[int, ...]  # batch index -> device position that runs it
    demand_s: dict[str, float]  # model -> estimated seconds of all its calls
    est_finish_s: float = 0.0  # the list schedule's estimated makespan (demand policy; 0 otherwise)

    def device_work(self, batches: tuple[Batch, ...]) -> list[float]:
        work = [0.0] * len(self.devices)
        for b in batches:
            work[self.batch_device[b.index]] += b.est_s
        return work

    def dump(self) -> str:
        lines = [f"placement policy={self.policy.value} devices={len(self.devices)} "
                 f"replicas={sum(len(r) for r in self.replicas.values())}"]
        for m, devs in self.replicas.items():
            lines.append(f"  {m}: {len(devs)} replica(s) on {', '.join(self.devices[d].key for d in devs)} "
                         f"(demand {self.demand_s.get(m, 0.0):.4g}s)")
        return "\n".join(lines)


def place(graph: Graph, ctx: PassContext) -> Graph:
    cluster = ctx.cluster
    if cluster is None or cluster.is_local:
        return graph  # one process: nothing to place (and no annotation, so local plans are unchanged)
    out = graph.copy()
    out.annotations["placement"] = build_placement(graph, graph.annotations["batches"],
                                                   graph.annotations["schedule"].order, ctx)
    return out


def build_placement(graph: Graph, batches: tuple[Batch, ...], order: tuple[int, ...], ctx: PassContext) -> Placement:
    devices = tuple(ctx.cluster.devices())
    headroom = ctx.config.memory_headroom
    budgets = tuple(None if d.memory is None else int(d.memory * (1.0 - headroom)) for d in devices)
    cost = ctx.cost
    sizes = footprints(batches, cost)
    need = {m: cost.base_bytes + s + cost.cost(m).load_extra_bytes for m, s in sizes.items()}
    largest = max((b for b in budgets), key=lambda b: math.inf if b is None else b)
    for m, n in need.items():
        if largest is not None and n > largest:
            raise MemoryBudgetError(m, n, largest, "runtime base + weights + its largest call + load transient, "
                                                   "on the largest device of the cluster (memory less headroom)")
    demand: dict[str, float] = {}
    for i in order:  # first-use order
        demand[batches[i].model] = demand.get(batches[i].model, 0.0) + batches[i].est_s
    policy = ctx.config.placement
    free = [math.inf if b is None else b - cost.base_bytes for b in budgets]
    if policy is PlacementPolicy.round_robin:
        replicas = _round_robin(list(demand), sizes, free)
    else:
        counts = {m: 1 for m in demand}
        if policy is PlacementPolicy.demand:
            fair = sum(demand.values()) / len(devices)
            counts = {m: min(len(devices), max(1, math.ceil(w / (REPLICA_SHARE * fair)))) if fair > 0 else 1
                      for m, w in demand.items()}
        replicas = _pack(demand, counts, sizes, free)
    if policy is PlacementPolicy.demand:
        batch_device, finish = _earliest_finish(graph, batches, order, replicas, devices, cost, ctx.done)
    else:
        batch_device, finish = tuple(replicas[b.model][0] for b in batches), 0.0
    return Placement(policy, devices, budgets, replicas, batch_device, demand, finish)


def _round_robin(models: list[str], sizes: dict[str, int], free: list[float]) -> dict[str, tuple[int, ...]]:
    replicas: dict[str, tuple[int, ...]] = {}
    cursor = 0
    for m in models:
        for k in range(len(free)):
            d = (cursor + k) % len(free)
            if sizes[m] <= free[d]:
                break
        else:  # full everywhere: the next device swaps it in (residency)
            d = cursor % len(free)
        free[d] -= sizes[m]
        replicas[m] = (d,)
        cursor = d + 1
    return replicas


def _pack(demand: dict[str, float], counts: dict[str, int], sizes: dict[str, int],
          free: list[float]) -> dict[str, tuple[int, ...]]:
    """Replicas largest per-replica share first, each onto the least-loaded device with room that does not hold
    the model yet; a model's first replica always gets a device (swapped in by residency if none has room),
    further replicas only where they fit."""
    load = [0.0] * len(free)
    placed: dict[str, list[int]] = {m: [] for m in demand}
    wanted = sorted(((demand[m] / counts[m], m, k) for m in demand for k in range(counts[m])),
                    key=lambda t: (t[2], -t[0]))  # every first replica before any second one
    for share, m, k in wanted:
        fits = [d for d in range(len(free)) if d not in placed[m] and sizes[m] <= free[d]]
        if not fits:
            if k:
                continue
            fits = [d for d in range(len(free))]
        d = min(fits, key=lambda d: (load[d], -free[d], d))
        placed[m].append(d)
        load[d] += share
        free[d] -= sizes[m]
    return {m: tuple(sorted(ds)) for m, ds in placed.items()}


def _earliest_finish(graph: Graph, batches: tuple[Batch, ...], order: tuple[int, ...],
                     replicas: dict[str, tuple[int, ...]], devices: tuple[Device, ...], cost,
                     done: frozenset[str]) -> tuple[tuple[int, ...], float]:
    """Each batch, in schedule order, on the replica estimated to finish it first (list scheduling)."""
    ready = [0.0] * len(devices)  # when each device's next load finishes (loads queue on its io stream)
    model_ready: dict[tuple[str, int], float] = {}
    for m, devs in replicas.items():
        for d in devs:
            ready[d] += cost.load_seconds(m)
            model_ready[(m, d)] = ready[d]
    free = [0.0] * len(devices)  # when each device's compute is next free
    node_done: dict[str, float] = {}
    batch_of: dict[str, int] = {nid: b.index for b in batches for nid in b.nodes}
    batch_end: dict[int, float] = {}
    nodes = graph.nodes

    def finished(nid: str) -> float:
        if nid in node_done:
            return node_done[nid]
        if nid in done:
            t = 0.0
        elif nid in batch_of:
            t = batch_end[batch_of[nid]]
        else:  # host node or fused part: when its inputs are
            node = nodes[nid]
            t = finished(node.part_of) if node.part_of is not None else max(
                (finished(p) for p in node.parents), default=0.0)
        node_done[nid] = t
        return t

    chosen = [0] * len(batches)
    for i in order:
        b = batches[i]
        inputs = max((finished(p) for nid in b.nodes for p in nodes[nid].parents), default=0.0)
        best = min(replicas[b.model],
                   key=lambda d: (max(free[d], inputs, model_ready[(b.model, d)]) + b.est_s, d))
        start = max(free[best], inputs, model_ready[(b.model, best)])
        free[best] = batch_end[i] = start + b.est_s
        chosen[i] = best
    return tuple(chosen), max(batch_end.values(), default=0.0)


register(Pass("place", place, requires=frozenset({"batches", "schedule"}), provides=frozenset({"placement"}),
              invalidates=frozenset({"residency"})))  # residency reads the placement: place runs before it
