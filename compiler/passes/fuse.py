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
Runtime contract: run the fused node once, split its reply with `split_answer`, store each part under
its original id. Part nodes are never in a generate step.

Why not `siblings` (b and c both reading a, asked in one call)? That needs a new "answer both" prompt
per parent group and gains little over batching them; chains save a whole dependent round trip.
Fusing still changes what the model sees (one longer prompt), which is why it is opt-in.
"""
from __future__ import annotations

import re

from compiler.config import PassContext
from compiler.ir import REFERENCE, Graph, Node, NodeKind
from compiler.levels import topo_order
from compiler.passes import register, rewritten

STEP_LINE = re.compile(r"^\s*step\s*(\d+)\s*[:.)-]\s*(.*)$", re.IGNORECASE)
FORMAT_TOKENS_PER_STEP = 4  # "Step i: " prefix the model writes for each step
PART_LABEL = "#fused"


@register("fuse")
def fuse(graph: Graph, ctx: PassContext) -> Graph:
    if "chains" not in ctx.config.fuse:
        return graph
    chains = find_chains(graph, ctx.config.fuse_max_chain)
    if not chains:
        return graph
    children = graph.children()
    replaced: dict[str, Node | None] = {}  # None: dropped (read by nothing outside its chain)
    for chain in chains:
        members = [graph.nodes[nid] for nid in chain]
        fused = fuse_chain(members)
        replaced[fused.id] = fused
        for node, following in zip(members, chain[1:]):
            outside = [c for c in children[node.id] if c != following]
            replaced[node.id] = part_node(node, fused.id) if outside else None
    out = rewritten(graph)
    out.nodes = {}
    for nid, node in graph.nodes.items():
        new = replaced.get(nid, node)
        if new is not None:
            out.nodes[nid] = new
    return out


def _fusable(node: Node) -> bool:
    return node.kind is NodeKind.SUBQUERY and not node.fused_from and node.part_of is None


def find_chains(graph: Graph, max_len: int) -> list[list[str]]:
    """Maximal same-expert chains (each link: the child reads only its parent), cut into pieces of
    at most `max_len` members; pieces of one member are dropped."""
    nodes = graph.nodes
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


def fuse_chain(chain: list[Node]) -> Node:
    """One node asking for every step; step i > 1 reads step i-1's answer from the same reply."""
    first, last = chain[0], chain[-1]
    lines = [f"Answer the following {len(chain)} steps in order; a later step may use an earlier step's answer."]
    for i, node in enumerate(chain, start=1):
        template = node.template
        if i > 1:  # a member's only parent is the previous member: every reference is to it
            template = REFERENCE.sub(f"[the answer to step {i - 1}]", template)
        lines.append(f"Step {i}: {template}")
    lines.append('Reply with exactly one line per step, formatted "Step <number>: <answer>".')
    return last.with_(
        template="\n".join(lines),
        inputs=dict(first.inputs),
        accepts=first.accepts,
        est_prompt_tokens=sum(n.est_prompt_tokens for n in chain),
        est_output_tokens=sum(n.est_output_tokens for n in chain) + FORMAT_TOKENS_PER_STEP * len(chain),
        fused_from=tuple(n.id for n in chain),
    )


def part_node(node: Node, fused_id: str) -> Node:
    """`node`, now answered by its part of `fused_id`'s reply (keeps its id, answer type and output estimate)."""
    return node.with_(template="{%s}" % PART_LABEL, inputs={PART_LABEL: fused_id}, accepts=None,
                      est_prompt_tokens=0, part_of=fused_id)


def split_answer(node: Node, reply: str) -> dict[str, str]:
    """Original node id -> its answer, parsed from a fused node's reply.

    A step the model did not label gets "", except the last step, which falls back to the whole reply:
    the last answer is the one the chain's consumers read, so they still get something to work with.
    """
    if not node.fused_from:
        return {node.id: reply}
    parts: dict[int, list[str]] = {}
    current = None
    for line in reply.splitlines():
        match = STEP_LINE.match(line)
        if match and 1 <= int(match.group(1)) <= len(node.fused_from):
            current = int(match.group(1))
            parts[current] = [match.group(2).strip()]
        elif current is not None and line.strip():
            parts[current].append(line.strip())
    answers = {nid: " ".join(parts.get(i, [])) for i, nid in enumerate(node.fused_from, start=1)}
    if not answers[node.fused_from[-1]]:
        answers[node.fused_from[-1]] = reply.strip()
    return answers
