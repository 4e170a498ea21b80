"""`fuse`: one model call does the work of a chain of calls on the same expert. Off by default.

Only the `chains` variant exists: a maximal path a -> b -> c of sub-queries on one expert where each
link is private (a feeds only b, b reads only a) becomes one node that asks for every step in order.
The fused node keeps the *last* id (so the chain's consumers need no rewrite), reads the first node's
inputs, and lists the originals in `Node.fused_from`; the runtime splits the reply with `split_answer`.

Why not `siblings` (b and c both reading a, fused into one call)? Their consumers would each need
one part of the fused answer, which a reference to a node id cannot express; doing it by convention
would silently hand consumers both answers and change their prompts. Chains have no such problem:
only the last step's answer leaves the fused node. Fusing can still change answers (the model sees a
longer prompt), which is why it is opt-in.
"""
from __future__ import annotations

import re

from compiler.config import PassContext
from compiler.ir import REFERENCE, Graph, Node, NodeKind
from compiler.levels import topo_order
from compiler.passes import register, rewritten

STEP_LINE = re.compile(r"^\s*step\s*(\d+)\s*[:.)-]\s*(.*)$", re.IGNORECASE)
FORMAT_TOKENS_PER_STEP = 4  # "Step i: " prefix the model writes for each step


@register("fuse")
def fuse(graph: Graph, ctx: PassContext) -> Graph:
    if "chains" not in ctx.config.fuse:
        return graph
    chains = find_chains(graph, ctx.config.fuse_max_chain)
    if not chains:
        return graph
    last_of = {}  # every chain member -> fused node id (its chain's last member)
    fused: dict[str, Node] = {}
    for chain in chains:
        node = fuse_chain([graph.nodes[nid] for nid in chain])
        fused[node.id] = node
        for nid in chain:
            last_of[nid] = node.id
    out = rewritten(graph)
    out.nodes = {}
    for nid, node in graph.nodes.items():
        if nid in last_of:
            if last_of[nid] == nid:
                out.nodes[nid] = fused[nid]
            continue
        out.nodes[nid] = node
    return out


def find_chains(graph: Graph, max_len: int) -> list[list[str]]:
    """Maximal private same-expert chains, split into pieces of at most `max_len` (each >= 2 long)."""
    nodes = graph.nodes
    children = graph.children()
    succ: dict[str, str] = {}
    for pid, kids in children.items():
        if len(kids) != 1:
            continue
        parent, child = nodes[pid], nodes[kids[0]]
        if (parent.kind is NodeKind.SUBQUERY and child.kind is NodeKind.SUBQUERY and parent.expert == child.expert
                and child.parents == (pid,) and not parent.fused_from and not child.fused_from):
            succ[pid] = child.id
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
        if i > 1:
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


def split_answer(node: Node, reply: str) -> dict[str, str]:
    """Original node id -> its answer, parsed from a fused node's reply.

    A step the model did not label gets "", except the last step, which falls back to the whole reply:
    the last answer is the one consumers read, so they still get something to work with.
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
