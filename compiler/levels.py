"""Topological levels: a node's level is the longest dependency path above it (sources are level 0).

Nodes on one level never depend on each other, so they can share a batch; levels also give the
planned order in which batches (and so model residency) are considered. Linear time (Kahn), for
verified graphs only (no cycles, no missing parents): passes run after the verifier.
"""
from __future__ import annotations

from compiler.ir import Graph


def topo_levels(graph: Graph) -> dict[str, int]:
    """Level per node id, keyed in `topo_order` order."""
    nodes = graph.nodes
    waiting: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    level: dict[str, int] = {}
    stack: list[str] = []
    for node in nodes.values():
        parents = node.parents
        if parents:
            waiting[node.id] = len(parents)
            for p in parents:
                children.setdefault(p, []).append(node.id)
        else:
            level[node.id] = 0
            stack.append(node.id)
    while stack:
        nid = stack.pop()
        below = level[nid] + 1
        for child in children.get(nid, ()):
            if level.get(child, -1) < below:
                level[child] = below
            waiting[child] -= 1
            if not waiting[child]:
                stack.append(child)
    if len(level) != len(nodes) or any(waiting.values()):
        raise ValueError("topo_levels needs a verified (acyclic, fully bound) graph")
    return {nid: level[nid] for nid in topo_order(graph, level)}


def topo_order(graph: Graph, levels: dict[str, int] | None = None) -> list[str]:
    """The same order as `Graph.topo_order()` (level by level, insertion order inside a level), in linear time.

    graphlib hands out ready nodes in waves, and wave k is exactly level k; bucketing by level in
    insertion order reproduces its sorted waves without graphlib's per-node overhead.
    """
    if levels is None:
        return list(topo_levels(graph))
    buckets: list[list[str]] = []
    for nid in graph.nodes:
        lv = levels[nid]
        while len(buckets) <= lv:
            buckets.append([])
        buckets[lv].append(nid)
    return [nid for bucket in buckets for nid in bucket]
