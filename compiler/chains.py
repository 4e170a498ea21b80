"""A fused chain's one model call: the prompt that asks every step, and the parser that splits the reply.

The `fuse` pass decides *which* nodes share a call; this module is the contract of such a call, read by
both the pass (to build the fused node) and the runtime (to give each original node its part of the reply),
so the runtime never imports a pass.
"""
from __future__ import annotations

import re
from typing import Sequence

from compiler.ir import REFERENCE, Node

STEP_LINE = re.compile(r"^\s*step\s*(\d+)\s*[:.)-]\s*(.*)$", re.IGNORECASE)
FORMAT_TOKENS_PER_STEP = 4  # "Step i: " prefix the model writes for each step


def fuse_chain(chain: Sequence[Node], output_tokens: Sequence[int]) -> Node:
    """One node asking for every step; step i > 1 reads step i-1's answer from the same reply.

    `output_tokens`: each member's output estimate as the cost model reads it (unknown estimates resolved)."""
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
        est_output_tokens=sum(output_tokens) + FORMAT_TOKENS_PER_STEP * len(chain),
        fused_from=tuple(n.id for n in chain),
    )


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
