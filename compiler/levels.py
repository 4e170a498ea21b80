"""Topological levels: a node's level is the longest dependency path above it (sources are level 0).

Nodes on one level never depend on each other, so they can share a batch; levels also give the
planned order in which batches (and so model residency) are considered. A part node of a fused
call (`Node.part_of`) shares that call's level: it is answered by it, not by a call of its own.
Linear time (Kahn), for verified graphs only (no cycles, no missing parents): passes run after the verifier.
"""
from __future__ import annotations

from compiler.ir import Graph


def waves(graph: Graph) -> dict[str, int]:
    """Longest-path depth of every node (what graphlib's ready-waves are), in graph order."""
    nodes = graph.nodes
    waiting: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    depth: dict[str, int] = {}
    stack: list[str] = []
    for node in nodes.values():
        parents = node.parents
        if parents:
            waiting[node.id] = len(parents)
            for p in parents:
                children.setdefault(p, []).append(node.id)
        else:
            depth[node.id] = 0
            stack.append(node.id)
    while stack:
        nid = stack.pop()
        below = depth[nid] + 1
        for child in children.get(nid, ()):
            if depth.get(child, -1) < below:
                depth[child] = below
            waiting[child] -= 1
            if not waiting[child]:
                stack.append(child)
    if len(depth) != len(nodes) or any(waiting.values()):
        raise ValueError("levels need a verified (acyclic, fully bound) graph")
    return depth


def topo_order(graph: Graph, depth: dict[str, int] | None = None) -> list[str]:
    """The same order as `Graph.topo_order()` (wave by wave, graph order inside a wave), in linear time.

    graphlib hands out ready nodes in waves, and wave k is exactly longest-path depth k; bucketing by
    depth in graph order reproduces its sorted waves without graphlib's per-node overhead.
    """
    if depth is None:
        depth = waves(graph)
    buckets: list[list[str]] = []
    for nid in graph.nodes:
        d = depth[nid]
        while len(buckets) <= d:
            buckets.append([])
        buckets[d].append(nid)
    return [nid for bucket in buckets for nid in bucket]


def topo_levels(graph: Graph, done: frozenset[str] = frozenset()) -> dict[str, int]:
    """Scheduling level per node id (keyed in topological order): depth, except that part nodes share
    their fused node's level, and so do consumers that are only held back by them. Nodes in `done` (answered by
    an earlier plan increment) get no level: for the others they are answers already there."""
    if done:
        graph = Graph({nid: node.with_(inputs={k: p for k, p in node.inputs.items() if p not in done})
                       for nid, node in graph.nodes.items() if nid not in done})
    depth = waves(graph)
    order = topo_order(graph, depth)
    nodes = graph.nodes
    if not any(n.part_of is not None for n in nodes.values()):
        return {nid: depth[nid] for nid in order}
    level: dict[str, int] = {}
    for nid in order:
        node = nodes[nid]
        level[nid] = max((level[p] + (0 if node.part_of == p else 1) for p in node.parents), default=0)
    return level
