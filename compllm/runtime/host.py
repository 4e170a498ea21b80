"""Host steps: answers that need no model call, computed from parents' answers exactly as the IR says.

`HostOp.JOIN` is a query's final answer when no model writes it: the answers of the parts nothing else reads,
unchanged and in order ("1. …" per part when there are several, the answer itself when there is one), and a
part that has no answer says so and why, so a final answer never hides a missing part.
"""
from __future__ import annotations

from typing import Mapping

from compiler.ir import HostOp, Node
from compllm.runtime.result import NodeResult


def run_host(node: Node, results: Mapping[str, NodeResult]) -> tuple[str, str]:
    """(answer, error): the host node's answer, and an error when none of its inputs has an answer."""
    if node.host is not HostOp.JOIN:
        raise ValueError(f"node {node.id!r}: unknown host op {node.host!r}")
    parts, missing = [], []
    for label, parent in node.inputs.items():
        res = results.get(parent)
        if res is not None and res.ok:
            parts.append((" ".join(res.answer.split()), True))
        else:
            why = (res.error or res.status) if res is not None else "did not run"
            parts.append((f"(not answered: {why})", False))
            missing.append(f"part {label.lstrip('#')}: {why}")
    if not any(ok for _, ok in parts):
        return "", f"no part was answered ({'; '.join(missing)})"
    if len(parts) == 1:
        return parts[0][0], ""
    return "\n".join(f"{i}. {text}" for i, (text, _) in enumerate(parts, start=1)), ""
