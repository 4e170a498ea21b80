"""`dedupe`: identical work is computed once, also across queries.

Two sub-query nodes are identical when they run on the same expert, expect the same answer type,
and their templates are equal once every reference is resolved to the (already deduped) parent it
reads, with the same parents in the same order. Processing parents first makes this transitive:
"population of {capital of France}" dedupes once "capital of France" did. Aggregate nodes are never
deduped (each query keeps its own sink), nor are nodes of a fused chain. Removed ids are recorded
in `annotations["aliases"]` (removed -> kept) so the runtime can report every original node's answer.
"""
from __future__ import annotations

from dataclasses import replace

from compiler.config import PassContext
from compiler.ir import REFERENCE, Graph, NodeKind
from compiler.levels import topo_order
from compiler.passes.registry import DERIVED, Pass, register, rewritten


def dedupe(graph: Graph, ctx: PassContext) -> Graph:
    nodes = graph.nodes
    kept_for: dict[str, str] = {}  # removed id -> kept id
    first_with: dict[tuple, str] = {}  # dedupe key -> kept id
    order = topo_order(graph)  # parents before children: their canonical ids are final
    # work an earlier plan increment already answers is registered first: new work may reuse it, never replace it
    for nid in [n for n in order if n in ctx.done] + [n for n in order if n not in ctx.done]:
        node = nodes[nid]
        if node.kind is NodeKind.RETRIEVE:
            pass  # the same lookup (source, question, inputs) is read once
        elif node.kind is not NodeKind.SUBQUERY or node.fused_from or not node.needs_model:
            continue  # aggregates stay per query; fused calls and their parts are bound to each other
        inputs = {label: kept_for.get(p, p) for label, p in node.inputs.items()}
        resolved = REFERENCE.sub(lambda m: "{@" + inputs.get(m.group(1), m.group(1)) + "}", node.template)
        key = (node.expert, node.answer_type, node.accepts, resolved, tuple(inputs.values()))
        kept = first_with.setdefault(key, nid)
        if kept != nid and nid not in ctx.done:
            kept_for[nid] = kept
    if not kept_for:
        return graph

    out = rewritten(graph)
    out.nodes = {}
    for nid, node in nodes.items():  # rebuild in insertion order so dumps and plans stay stable
        if nid in kept_for:
            continue
        if any(p in kept_for for p in node.inputs.values()):
            node = node.with_(inputs={label: kept_for.get(p, p) for label, p in node.inputs.items()})
            if node.guard is not None and node.guard.source in kept_for:  # the guard reads the kept twin too
                node = node.with_(guard=replace(node.guard, source=kept_for[node.guard.source]))
        out.nodes[nid] = node
    aliases = {old: kept_for.get(new, new) for old, new in graph.annotations.get("aliases", {}).items()}
    aliases.update(kept_for)
    out.annotations["aliases"] = aliases
    return out


register(Pass("dedupe", dedupe, provides=frozenset({"aliases"}), invalidates=DERIVED))
