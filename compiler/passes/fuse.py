"""`fuse`: one model call does the work of a chain of calls on the same expert. Off by default.

Only the `chains` variant exists. A link p -> c is fusable when both are sub-queries on one expert,
c reads only p, and c is p's only such child; maximal runs of fusable links (cut at
`fuse_max_chain`) become one call that asks for every step in order:
- the *last* member's id becomes the fused node: it reads the first member's inputs, asks all steps
  (step i reads step i-1 inside the same reply) and lists the originals in `Node.fused_from`;
- every other member that something outside the chain reads (typically the query's aggregate)
  stays in the graph as a *part node* (`Node.part_of` = the fused id, its only input): no model
  call, answered by its part of the fused reply, read by its original id, so consumers' prompts do
  not change. A member read only by the next member is dropped (its answer is still in the reply).
Runtime contract: run the fused node once, split its reply with `compiler.chains.split_answer`, store each
part under its original id. Part nodes are never in a generate step.

Why not `siblings` (b and c both reading a, asked in one call)? That needs a new "answer both" prompt
per parent group and gains little over batching them; chains save a whole dependent round trip.
Fusing still changes what the model sees (one longer prompt), which is why it is opt-in.
"""
from __future__ import annotations

from compiler.chains import fuse_chain
from compiler.config import PassContext
from compiler.ir import Graph, Node, NodeKind
from compiler.levels import topo_order
from compiler.passes.registry import DERIVED, Pass, register, rewritten

PART_LABEL = "#fused"


def fuse(graph: Graph, ctx: PassContext) -> Graph:
    if "chains" not in ctx.config.fuse:
        return graph
    chains = find_chains(graph, ctx.config.fuse_max_chain, ctx.done)
    if not chains:
        return graph
    children = graph.children()
    # a node other nodes were deduplicated onto stays addressable: their readers may still be on their way
    targets = set(graph.annotations.get("aliases", {}).values())
    replaced: dict[str, Node | None] = {}  # None: dropped (read by nothing outside its chain)
    for chain in chains:
        members = [graph.nodes[nid] for nid in chain]
        fused = fuse_chain(members, [ctx.cost.output_tokens(n) for n in members])
        replaced[fused.id] = fused
        for node, following in zip(members, chain[1:]):
            outside = [c for c in children[node.id] if c != following] or node.id in targets
            replaced[node.id] = part_node(node, fused.id) if outside else None
    out = rewritten(graph)
    out.nodes = {}
    for nid, node in graph.nodes.items():
        new = replaced.get(nid, node)
        if new is not None:
            out.nodes[nid] = new
    return out


register(Pass("fuse", fuse, invalidates=DERIVED))


def find_chains(graph: Graph, max_len: int, done: frozenset[str] = frozenset()) -> list[list[str]]:
    """Maximal same-expert chains (each link: the child reads only its parent), cut into pieces of
    at most `max_len` members; pieces of one member are dropped. Nodes in `done` (answered by an earlier plan
    increment) are never fused, nor nodes of a query still being planned (a later part may read any of them)."""
    nodes = graph.nodes

    def _fusable(node: Node) -> bool:
        complete = node.provenance is None or node.provenance.query_id in graph.queries
        return (node.kind is NodeKind.SUBQUERY and not node.fused_from and node.needs_model and complete
                and node.id not in done)

    succ: dict[str, str] = {}
    ambiguous: set[str] = set()
    for node in nodes.values():
        if len(node.parents) != 1 or not _fusable(node):
            continue
        parent = nodes[node.parents[0]]
        if not _fusable(parent) or parent.expert != node.expert:
            continue
        if parent.id in succ:  # two single-parent children: a tree, not a chain; fuse neither
            ambiguous.add(parent.id)
        succ[parent.id] = node.id
    for pid in ambiguous:
        del succ[pid]
    has_pred = set(succ.values())
    chains = []
    for nid in topo_order(graph):
        if nid not in succ or nid in has_pred:
            continue
        chain = [nid]
        while chain[-1] in succ:
            chain.append(succ[chain[-1]])
        for start in range(0, len(chain), max_len):
            piece = chain[start:start + max_len]
            if len(piece) >= 2:
                chains.append(piece)
    return chains


def part_node(node: Node, fused_id: str) -> Node:
    """`node`, now answered by its part of `fused_id`'s reply (keeps its id, answer type and output estimate)."""
    return node.with_(template="{%s}" % PART_LABEL, inputs={PART_LABEL: fused_id}, accepts=None,
                      est_prompt_tokens=0, part_of=fused_id)
