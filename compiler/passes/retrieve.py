"""`retrieve`: group retrieve nodes (knowledge lookups) into batched lookups, across nodes and queries.

Retrieve nodes need no model: they read an index. Nodes that become ready together (same topological level) and
read the same source share one lookup call (one tokenization and one sparse product for many questions), cut at
`max_call_size` questions (`max_batch_size` when that is unset, so the sequential baseline looks up one at a
time). Each lookup is costed by the cost model (`retrieve_seconds`: a call's fixed cost plus a per-question
cost, both measured when the index loads); the indexes' memory is part of the runtime's base (see
`CostModel.with_sources`), so the budget the other passes plan in already holds them.
Output: `annotations["retrievals"]`, a tuple of `Lookup` in level order; lowering emits one retrieve step each.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.config import PassContext
from compiler.errors import CompileError
from compiler.ir import Graph, NodeKind
from compiler.levels import topo_levels
from compiler.passes.registry import Pass, register


@dataclass(frozen=True)
class Lookup:
    """One planned retrieve step: one source, one level, its questions looked up in one call."""

    index: int
    source: str
    level: int
    nodes: tuple[str, ...]
    est_s: float

    def dump(self) -> str:
        return f"lookup {self.index} level={self.level} source={self.source} est={self.est_s:.3g}s " \
               f"nodes({', '.join(self.nodes)})"


def retrieve(graph: Graph, ctx: PassContext) -> Graph:
    out = graph.copy()
    out.annotations["retrievals"] = make_lookups(graph, ctx)
    return out


def make_lookups(graph: Graph, ctx: PassContext) -> tuple[Lookup, ...]:
    if not any(n.kind is NodeKind.RETRIEVE and n.id not in ctx.done for n in graph.nodes.values()):
        return ()
    cap = ctx.config.max_call_size or ctx.config.max_batch_size
    levels = topo_levels(graph, ctx.done)
    groups: dict[tuple[int, str], list[str]] = {}
    for nid, node in graph.nodes.items():
        if node.kind is NodeKind.RETRIEVE and nid not in ctx.done:
            groups.setdefault((levels[nid], ctx.cost.source_of(node)), []).append(nid)
    lookups: list[Lookup] = []
    for (level, source) in sorted(groups, key=lambda key: key[0]):  # stable: sources in first-appearance order
        members = groups[(level, source)]
        for start in range(0, len(members), cap):
            chunk = tuple(members[start:start + cap])
            lookups.append(Lookup(len(lookups), source, level, chunk, ctx.cost.retrieve_seconds(source, len(chunk))))
    return tuple(lookups)


def check_lookups(graph: Graph, lookups: tuple[Lookup, ...], done: frozenset[str] = frozenset()) -> None:
    """Every retrieve node not answered yet in exactly one lookup; CompileError names the first violation."""
    seen: dict[str, int] = {}
    for lk in lookups:
        for nid in lk.nodes:
            node = graph.nodes.get(nid)
            if node is None or node.kind is not NodeKind.RETRIEVE or nid in done:
                raise CompileError(f"lookup {lk.index} names {nid!r}, which is not a retrieve node to answer "
                                   "(stale lookups: run `retrieve` after passes that rewrite nodes)")
            if nid in seen:
                raise CompileError(f"retrieve node {nid!r} is in lookups {seen[nid]} and {lk.index}")
            seen[nid] = lk.index
    missing = [nid for nid, n in graph.nodes.items() if n.kind is NodeKind.RETRIEVE and nid not in seen
               and nid not in done]
    if missing:
        raise CompileError(f"{len(missing)} retrieve node(s) in no lookup, e.g. {missing[:3]}: add the `retrieve` "
                           "pass to compiler.passes")


register(Pass("retrieve", retrieve, provides=frozenset({"retrievals"}),
              check=lambda graph, ctx: check_lookups(graph, graph.annotations["retrievals"], ctx.done)))
