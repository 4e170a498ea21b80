"""`place`: on a cluster, which devices hold which model, how many replicas each gets, and which replica runs
each call (the `batch` pass's batches). On the local process (`cluster=local`, no nodes) it does nothing.

Why the compiler: it knows every call of every model before anything runs (the graph), so it can size replicas
by demand instead of guessing, and spread one model's calls over its replicas by when they can start.

Policies (`compiler.placement`):
- `demand` (default): demand per model = the cost model's seconds of all its calls. Replica counts: the
  smallest per-device work target T (bisection) for which every model, cut into ceil(demand / (T - its load
  seconds)) replicas, packs onto the devices within T and their memory (weights + largest call, under the
  device's memory less headroom): replicas bigger than half a device first, best fit in memory, then the rest
  largest work share first onto the least busy device. Calls are then ordered by HEFT's upward rank (a call's
  seconds plus the longest chain of calls waiting for it: critical-path slack decides, not level) and each goes
  to the replica estimated to finish it first, in the earliest gap of that device after its inputs and its
  replica's load (list scheduling with insertion over the cost model). Finally replicas are added where the
  estimated schedule ends late (`_improve`). Devices run their calls in estimated start order. Models too big to
  share a device with any other get devices of their own (`_exclusive_first`), which the model whose calls come
  last (the aggregator's) takes over once they are done: *late replicas* (`_earliest_finish`); residency then
  evicts the big model there and loads the late one, as the estimate assumed.
- `one_per_expert`: one replica per model, largest demand first onto the least busy device with memory for it
  (LPT, no replication), every call on that replica.
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

#: `_improve` list-schedules at most this many candidate placements per start (each O(calls x replicas)).
MAX_EVALUATIONS = 100
#: ... trying at most this many devices per model and kind of move in one round.
TRIES_PER_MODEL = 3


@dataclass(frozen=True)
class Placement:
    policy: PlacementPolicy
    devices: tuple[Device, ...]
    budgets: tuple[Optional[int], ...]  # per device: the bytes plans fit into (memory less headroom)
    replicas: dict[str, tuple[int, ...]]  # model -> device positions holding a replica
    batch_device: tuple[int, ...]  # batch index -> device position that runs it
    demand_s: dict[str, float]  # model -> estimated seconds of all its calls
    est_finish_s: float = 0.0  # the list schedule's estimated makespan (demand policy; 0 otherwise)
    order: tuple[int, ...] = ()  # batch indices in the order devices run them (a topological order)

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
    room = [math.inf if b is None else b - cost.base_bytes for b in budgets]
    if policy is PlacementPolicy.round_robin:
        replicas = _round_robin(list(demand), sizes, list(room))
    elif policy is PlacementPolicy.one_per_expert:
        replicas = _pack(demand, {m: 1 for m in demand}, sizes, list(room))
    else:
        replicas = _replicate(demand, sizes, room, {m: cost.load_seconds(m) for m in demand})
    if policy is PlacementPolicy.demand:
        ranked = _by_rank(graph, batches, order, ctx.done)
        replicas, batch_device, finish, order = _improve(graph, batches, ranked, replicas, sizes, room, cost,
                                                         ctx.done)
    else:
        batch_device, finish = tuple(replicas[b.model][0] for b in batches), 0.0
    return Placement(policy, devices, budgets, replicas, batch_device, demand, finish, tuple(order))


def _replicate(demand: dict[str, float], sizes: dict[str, int], room: list[float],
               load_s: dict[str, float]) -> dict[str, tuple[int, ...]]:
    """Replica counts and devices for the `demand` policy: the smallest per-device work target T for which
    every model, cut into ceil(demand / T) replicas of equal work, packs onto the devices within T and memory
    (bisection over T); models that cannot all fit at any T fall back to one replica each (`_pack`)."""
    n = len(room)
    total = sum(demand.values())
    hi = max(demand.values(), default=0.0) + total / n + max(load_s.values(), default=0.0)
    best = _tightest_pack(demand, sizes, room, load_s, total / n, hi, rounds=40)
    return best if best is not None else _pack(demand, {m: 1 for m in demand}, sizes, list(room))


def _pack_within(demand: dict[str, float], sizes: dict[str, int], room: list[float], target: float,
                 load_s: dict[str, float]) -> Optional[dict[str, tuple[int, ...]]]:
    """Replicas of ceil(demand / target) per model (at most one per device), largest footprint first, each on
    the device with the least work that still has the memory and stays within `target`; None if one does not fit."""
    n = len(room)
    free, work = list(room), [0.0] * n
    placed: dict[str, list[int]] = {m: [] for m in demand}
    items = []
    for m, w in demand.items():
        load = load_s[m]  # a replica computes only once it is loaded: its load counts against the target
        r = min(n, max(1, math.ceil(w / (target - load) - 1e-9))) if target > load else n
        items += [(sizes[m], w / r + load, m)] * r
    half = max(room) / 2
    # big replicas (over half a device) first, largest first, best fit in memory; then the small ones, largest
    # work share first (LPT), onto the least busy device with memory for them
    items.sort(key=lambda t: (-t[0], -t[1]) if t[0] > half else (math.inf, -t[1]))
    for size, share, m in items:
        fits = [d for d in range(n) if size <= free[d] and work[d] + share <= target * (1 + 1e-9)
                and d not in placed[m]]
        if not fits:
            return None
        d = min(fits, key=lambda d: (free[d], work[d], d) if size > half else (work[d], free[d], d))
        placed[m].append(d)
        work[d] += share
        free[d] -= size
    return {m: tuple(sorted(ds)) for m, ds in placed.items()}


def _improve(graph: Graph, batches: tuple[Batch, ...], order: list[int], replicas: dict[str, tuple[int, ...]],
             sizes: dict[str, int], room: list[float], cost, done: frozenset[str],
             ) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...], float, list[int]]:
    """Replicas where time, not total work, needs them: a model whose calls all come late (the aggregator,
    which waits for every sub-query) finishes last however balanced the totals are. So: list-schedule; for the
    models on the chain of calls that ends last, then those of the busiest replicas, try one more replica on the
    least-busy device with memory for it (or, when none has, on one where dropping spare replicas of other
    models makes room), and keep the first try that shortens the estimated makespan; stop when none does, after
    at most MAX_EVALUATIONS list schedules (at most one try per device per model). Also tried: a late replica
    (a device taken over once it is done, see `_earliest_finish`) on the devices done first. The search runs from
    `replicas` and from `_exclusive_first`'s start when it differs, and the better end is kept (a greedy
    search from a better start does not always end better)."""
    load_s = {m: cost.load_seconds(m) for m in replicas}
    inputs_of = _input_batches(graph, batches, done)
    starts = [(replicas, set())]
    alt, late = _exclusive_first(batches, order, replicas, sizes, room, load_s, inputs_of)
    if late:
        starts.append((alt, late))
    ends = [_search(batches, order, r, lt, sizes, room, load_s, inputs_of) for r, lt in starts]
    return min(ends, key=lambda e: e[2])


def _search(batches: tuple[Batch, ...], order: list[int], replicas: dict[str, tuple[int, ...]],
            late: set[tuple[str, int]], sizes: dict[str, int], room: list[float], load_s: dict[str, float],
            inputs_of: list[tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...], float, list[int]]:
    """`_improve`'s greedy search from one start."""
    n = len(room)
    free = list(room)
    for m, devs in replicas.items():
        for d in devs:
            if (m, d) not in late:
                free[d] -= sizes[m]
    for m, d in late:
        free[d] = -math.inf  # taken over: no further replicas beside it
    batch_device, finish, ends, run_order, blame = _earliest_finish(batches, order, replicas, n, load_s, inputs_of,
                                                                    frozenset(late))
    tried: set[tuple[str, int]] = set()
    tried_late: set[tuple[str, int]] = set()
    evaluations = 0
    while evaluations < MAX_EVALUATIONS:
        busy = [0.0] * n
        device_end = [0.0] * n
        for b in batches:
            busy[batch_device[b.index]] += b.est_s
            device_end[batch_device[b.index]] = max(device_end[batch_device[b.index]], ends[b.index])
        improved = False
        chain = [batches[i].model for i in _critical_chain(ends, blame)]  # the chain that ends last
        chain += [batches[i].model for i in sorted(ends, key=lambda i: -ends[i])[:8]]  # and the last calls
        per_replica = {}
        for b in batches:
            per_replica[(b.model, batch_device[b.index])] = per_replica.get((b.model, batch_device[b.index]), 0.0) \
                + b.est_s
        loaded = [m for (m, _), w in sorted(per_replica.items(), key=lambda t: -t[1])[:8]]  # the busiest replicas
        late_devices = {d for _, d in late}
        for m in dict.fromkeys(chain + loaded):
            moves = []
            fits = [d for d in range(n) if d not in replicas[m] and sizes[m] <= free[d] and (m, d) not in tried]
            if fits:  # the least busy few devices with memory for it
                moves += [(d, [], {}) for d in sorted(fits, key=lambda d: (busy[d], -free[d], d))[:TRIES_PER_MODEL]]
            else:  # no room anywhere: make room on a lightly used device by dropping spare replicas there
                d, drop, moved = _make_room(m, replicas, sizes, free, per_replica, busy, tried, late_devices)
                if d is not None:
                    moves.append((d, drop, moved))
            # or a late replica on the device that is done first, if everything it holds has replicas elsewhere
            takeover = [d for d in range(n) if d not in replicas[m] and d not in late_devices
                        and sizes[m] <= room[d] and (m, d) not in tried_late
                        and all(len(v) > 1 for k, v in replicas.items() if d in v)]
            if takeover:
                moves += [(d, [], None) for d in sorted(takeover, key=lambda d: (device_end[d], d))[:TRIES_PER_MODEL]]
            for d, drop, moved in moves:
                is_late = moved is None
                (tried_late if is_late else tried).add((m, d))
                trial = {k: tuple(x for x in v if not (x == d and (k in drop or k in (moved or {}))))
                         for k, v in replicas.items()}
                for k, x in (moved or {}).items():
                    trial[k] = tuple(sorted(trial[k] + (x,)))
                trial[m] = tuple(sorted(replicas[m] + (d,)))
                t_late = frozenset(late | {(m, d)}) if is_late else frozenset(late)
                t_device, t_finish, t_ends, t_order, t_blame = _earliest_finish(batches, order, trial, n, load_s,
                                                                                inputs_of, t_late)
                evaluations += 1
                if t_finish < finish * (1 - 1e-6):
                    replicas, batch_device, finish, ends, run_order, blame = (trial, t_device, t_finish, t_ends,
                                                                              t_order, t_blame)
                    if is_late:
                        late.add((m, d))
                        free[d] = -math.inf  # taken over: no further replicas beside it
                    else:
                        free[d] += sum(sizes[k] for k in drop) + sum(sizes[k] for k in moved) - sizes[m]
                        for k, x in moved.items():
                            free[x] -= sizes[k]
                    improved = True
                    break
            if improved:
                break
        if not improved:
            break
    return replicas, batch_device, finish, run_order


def _exclusive_first(batches: tuple[Batch, ...], order: list[int], replicas: dict[str, tuple[int, ...]],
                     sizes: dict[str, int], room: list[float], load_s: dict[str, float],
                     inputs_of: list[tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], set[tuple[str, int]]]:
    """The best start for `_improve` by list-scheduled makespan: `replicas` (from `_replicate`) or one of a few
    placements that give models too big to share a device (a 70B replica) devices of their own, the largest
    first, with as many replicas as `_replicate` gave them plus one for the `extra` busiest per replica
    (0 to all of them), pack the other
    models onto the other devices (`_pack_within`, bisection, a load counted once per device rather than per
    replica: a device loads its next model while it computes), and let the model whose calls come last
    (the aggregator's) take the big devices over once they are done (late replicas: `_earliest_finish`),
    counting only `frac` of its demand on the other devices. Why: a big model with too few replicas keeps
    its devices busy to the end, and its dependents wait; with more, the others would be short of devices
    unless the big devices serve the last calls after their own."""
    n = len(room)
    demand: dict[str, float] = {}
    for b in batches:
        demand[b.model] = demand.get(b.model, 0.0) + b.est_s
    best = (_earliest_finish(batches, order, replicas, n, load_s, inputs_of)[1], replicas, set())
    smallest = min(sizes.values(), default=0)
    big = sorted((m for m in demand if sizes[m] + smallest > max(room, default=0)), key=lambda m: -demand[m])
    tail = [batches[i].model for i in order[-max(1, len(order) // 10):]]  # the calls ranked last
    last = max(set(tail), key=lambda m: (tail.count(m), m)) if tail else None
    if not big or last is None or last in big:
        return best[1], best[2]
    base = {m: len(replicas[m]) for m in big}
    by_share = sorted(big, key=lambda m: -demand[m] / base[m])
    zero = {m: 0.0 for m in demand}
    for extra in sorted({round(k * len(big) / 8) for k in range(9)}):  # at most 9 choices
        counts = {m: base[m] + (1 if m in by_share[:extra] else 0) for m in big}
        devices = sorted(range(n), key=lambda d: (-room[d], d))
        if sum(counts.values()) >= n or any(sizes[m] > room[devices[0]] for m in big):
            continue
        placed: dict[str, tuple[int, ...]] = {}
        used: list[int] = []
        for m in big:
            placed[m] = tuple(sorted(devices[len(used):len(used) + counts[m]]))
            used += placed[m]
        if any(sizes[m] > room[d] for m in big for d in placed[m]):
            continue
        rest_room = [0.0 if d in used else room[d] for d in range(n)]
        for frac in (1.0, 0.5, 0.3, 0.1):
            rest = {m: w * (frac if m == last else 1.0) for m, w in demand.items() if m not in big}
            packed = _bisect_pack(rest, sizes, rest_room, zero, n - len(used))
            if packed is None:
                continue
            trial = {**placed, **{m: ds for m, ds in packed.items()}}
            late = {(last, d) for d in used}
            trial[last] = tuple(sorted(set(trial[last]) | set(used)))
            finish = _earliest_finish(batches, order, trial, n, load_s, inputs_of, frozenset(late))[1]
            if finish < best[0] * (1 - 1e-6):
                best = (finish, trial, late)
    return best[1], best[2]


def _bisect_pack(demand: dict[str, float], sizes: dict[str, int], room: list[float], load_s: dict[str, float],
                 devices: int) -> Optional[dict[str, tuple[int, ...]]]:
    """`_pack_within` at the smallest work target bisection finds (None if nothing packs)."""
    if devices <= 0:
        return None
    lo = sum(demand.values()) / devices
    hi = lo + max(demand.values(), default=0.0) + max(load_s.values(), default=0.0) + 1.0
    return _tightest_pack(demand, sizes, room, load_s, lo, hi, rounds=30)


def _tightest_pack(demand: dict[str, float], sizes: dict[str, int], room: list[float], load_s: dict[str, float],
                   lo: float, hi: float, rounds: int) -> Optional[dict[str, tuple[int, ...]]]:
    """`_pack_within` at the smallest per-device work target in [lo, hi] that bisection finds (None if even `hi`
    does not pack)."""
    best = _pack_within(demand, sizes, room, hi, load_s)
    if best is None:
        return None
    for _ in range(rounds):
        mid = (lo + hi) / 2
        packed = _pack_within(demand, sizes, room, mid, load_s)
        if packed is None:
            lo = mid
        else:
            best, hi = packed, mid
        if hi - lo < 1e-3 * hi:
            break
    return best


def _make_room(m: str, replicas: dict[str, tuple[int, ...]], sizes: dict[str, int], free: list[float],
               per_replica: dict[tuple[str, int], float], busy: list[float], tried: set[tuple[str, int]],
               taken: set[int] = frozenset(),
               ) -> tuple[Optional[int], list[str], dict[str, int]]:
    """A device (least busy first) where dropping replicas of models that keep another replica, least used
    first, and then moving single replicas to the least busy other device with memory for them, frees enough
    memory for `m`; (None, [], {}) if there is none. Returns the device, the models dropped there and the
    models moved (model -> the device it moves to)."""
    for d in sorted(range(len(free)), key=lambda d: (busy[d], d)):
        if d in replicas[m] or (m, d) in tried or d in taken:
            continue
        here = sorted((k for k, v in replicas.items() if d in v and k != m),
                      key=lambda k: (len(replicas[k]) == 1, per_replica.get((k, d), 0.0)))
        room, drop, moves = free[d], [], {}
        spare = list(free)
        for k in here:
            if room >= sizes[m]:
                break
            if len(replicas[k]) > 1:
                drop.append(k)
            else:
                to = [x for x in range(len(free)) if x != d and x not in taken and sizes[k] <= spare[x]
                      and x not in replicas[k]]
                if not to:
                    break
                x = min(to, key=lambda x: (busy[x], x))
                spare[x] -= sizes[k]
                moves[k] = x
            room += sizes[k]
        if room >= sizes[m]:
            return d, drop, moves
    return None, [], {}


def _critical_chain(ends: dict[int, float], blame: dict[int, int]) -> list[int]:
    """From the call that ends last back through what each call waited for (an input or the call before it on
    its device), latest first."""
    chain: list[int] = []
    i = max(ends, key=lambda i: ends[i], default=None)
    while i is not None and i >= 0 and len(chain) < 64:
        chain.append(i)
        i = blame.get(i)
    return chain


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


def _children(graph: Graph) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        for p in node.parents:
            out.setdefault(p, []).append(node.id)
    return out


def _by_rank(graph: Graph, batches: tuple[Batch, ...], order: tuple[int, ...], done: frozenset[str]) -> list[int]:
    """The batches longest-remaining-path first (HEFT's upward rank: a call's seconds plus the longest chain of
    calls that wait for it), so calls on the critical path are not queued behind calls with slack. A
    topological order: a call's rank exceeds every dependent's (ties: lower level first)."""
    children = _children(graph)
    batch_of = {nid: b.index for b in batches for nid in b.nodes}
    rank: dict[int, float] = {}
    tail: dict[str, float] = {}

    def after(nid: str) -> float:
        """The longest chain of calls that waits for node `nid` (not counting its own call)."""
        if nid not in tail:
            best = 0.0
            for c in children.get(nid, ()):
                best = max(best, rank[batch_of[c]] if c in batch_of else after(c))
            tail[nid] = best
        return tail[nid]

    for i in reversed(order):  # dependents first: the schedule is a topological order
        b = batches[i]
        rank[i] = b.est_s + max((after(nid) for nid in b.nodes), default=0.0)
    return sorted(order, key=lambda i: (-rank[i], batches[i].level, i))


def _input_batches(graph: Graph, batches: tuple[Batch, ...], done: frozenset[str]) -> list[tuple[int, ...]]:
    """For every batch, the batches whose answers it reads (through host nodes and fused parts), once."""
    batch_of = {nid: b.index for b in batches for nid in b.nodes}
    nodes = graph.nodes
    memo: dict[str, frozenset[int]] = {}

    def source(nid: str) -> frozenset[int]:
        if nid not in memo:
            if nid in done:
                memo[nid] = frozenset()
            elif nid in batch_of:
                memo[nid] = frozenset((batch_of[nid],))
            else:  # host node or fused part: answered when its inputs are
                node = nodes[nid]
                parents = (node.part_of,) if node.part_of is not None else node.parents
                memo[nid] = frozenset().union(*(source(p) for p in parents))
        return memo[nid]

    return [tuple(sorted(frozenset().union(*(source(p) for nid in b.nodes for p in nodes[nid].parents))))
            for b in batches]


def _earliest_finish(batches: tuple[Batch, ...], order: list[int], replicas: dict[str, tuple[int, ...]],
                     n_devices: int, load_s: dict[str, float], inputs_of: list[tuple[int, ...]],
                     late: frozenset[tuple[str, int]] = frozenset(),
                     ) -> tuple[tuple[int, ...], float, dict[int, float], list[int], dict[int, int]]:
    """Each batch, in `order` (by rank), on the replica estimated to finish it first, in the earliest gap of that
    device's timeline after its inputs are ready (list scheduling with insertion, as HEFT), so a call that waits
    for its inputs never holds up calls behind it. Returns the device of each batch, the estimated makespan,
    each batch's estimated end, the batches by estimated start (the order devices run them: a topological order,
    a call starts after its parents end; ties keep rank order), and what each batch waited for. A replica's
    load is estimated on its device's io stream from its first assigned call.

    A *late* replica (m, d) in `late` takes device d over once the calls placed there so far are done: the
    first call it gets *switches* d (its load starts when d's last call ends: residency evicts what d held,
    none of which is used there again), and from then on d runs only its late replicas. It is offered only
    once every call of the models d held before comes earlier in `order`, so none is left for after. So a device whose
    big model is done early (a 70B replica) serves the calls that come last (the aggregator's)."""
    io_free = [0.0] * n_devices
    loaded: dict[tuple[str, int], float] = {}
    slots: list[list[tuple[float, float]]] = [[] for _ in range(n_devices)]  # busy (start, end), sorted
    batch_end: dict[int, float] = {}
    batch_start: dict[int, float] = {}

    def earliest(d: int, ready: float, length: float) -> tuple[float, int]:
        """Earliest start >= ready with `length` free on device d, and where it goes in the timeline."""
        busy = slots[d]
        k = len(busy)
        while k > 0 and busy[k - 1][1] > ready:  # find the first interval ending after `ready`
            k -= 1
        t = ready
        while k < len(busy):
            if t + length <= busy[k][0] + 1e-12:
                return t, k
            t = max(t, busy[k][1])
            k += 1
        return t, k

    blame: dict[int, int] = {}  # batch -> the batch it waited for (input, or its device's call before it)
    owner: dict[tuple[int, float], int] = {}  # (device, end of a busy interval) -> its batch
    chosen = [0] * len(batches)
    last_end = [0.0] * n_devices  # the latest end of a call placed on each device
    switched = [False] * n_devices  # a late replica took the device over
    # a device may switch only once every call of what it held before is placed (none comes after the switch)
    last_pos = {batches[i].model: k for k, i in enumerate(order)}
    blocked_until = [-1] * n_devices
    for m, devs in replicas.items():
        for d in devs:
            if (m, d) not in late:
                blocked_until[d] = max(blocked_until[d], last_pos.get(m, -1))
    for pos, i in enumerate(order):
        b = batches[i]
        inputs, waited = 0.0, -1
        for j in inputs_of[i]:
            if batch_end[j] > inputs:
                inputs, waited = batch_end[j], j
        best = None
        for relax in (False, True):  # every replica of the model on a switched device: use it anyway
            for d in replicas[b.model]:
                is_late = (b.model, d) in late
                if switched[d] and not is_late and not relax:
                    continue
                if is_late and not switched[d] and pos <= blocked_until[d] and not relax:
                    continue  # d still has calls of its own to run
                if (b.model, d) in loaded:
                    ready = max(inputs, loaded[(b.model, d)])
                elif is_late and not switched[d]:
                    ready = max(inputs, max(io_free[d], last_end[d]) + load_s[b.model])
                else:
                    ready = max(inputs, io_free[d] + load_s[b.model])
                start, k = earliest(d, ready, b.est_s)
                if best is None or start < best[0] - 1e-12:
                    best = (start, d, k)
            if best is not None:
                break
        start, d, k = best
        if (b.model, d) not in loaded:
            if (b.model, d) in late and not switched[d]:
                switched[d] = True
                io_free[d] = max(io_free[d], last_end[d])
            loaded[(b.model, d)] = io_free[d] = io_free[d] + load_s[b.model]
        last_end[d] = max(last_end[d], start + b.est_s)
        if start > inputs + 1e-9 and k > 0 and abs(slots[d][k - 1][1] - start) < 1e-9:
            waited = owner[(d, slots[d][k - 1][1])]  # it waited for its device
        slots[d].insert(k, (start, start + b.est_s))
        owner[(d, start + b.est_s)] = i
        batch_start[i], batch_end[i] = start, start + b.est_s
        blame[i] = waited
        chosen[i] = d
    rank_pos = {i: k for k, i in enumerate(order)}
    by_start = sorted(order, key=lambda i: (batch_start[i], rank_pos[i]))
    return tuple(chosen), max(batch_end.values(), default=0.0), batch_end, by_start, blame


register(Pass("place", place, requires=frozenset({"batches", "schedule"}), provides=frozenset({"placement"}),
              invalidates=frozenset({"residency"})))  # residency reads the placement: place runs before it
