"""Graphviz and Mermaid views of the IR, so a person can look at a decomposition instead of reading it."""
from __future__ import annotations

from compiler.ir import Graph, Node, NodeKind


def _lines(node: Node, width: int = 48) -> tuple[str, str]:
    text = node.template if len(node.template) <= width else node.template[: width - 1] + "…"
    return f"{node.id} [{node.expert}]", " ".join(text.split())


def to_dot(graph: Graph) -> str:
    def label(node: Node) -> str:
        head, text = _lines(node)
        return f"{head}\\n{text}".replace('"', "'")

    lines = ["digraph compllm {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for node in graph:
        style = ", style=filled, fillcolor=lightgrey" if node.kind is NodeKind.AGGREGATE else ""
        lines.append(f'  "{node.id}" [label="{label(node)}"{style}];')
    for parent, child in graph.edges():
        lines.append(f'  "{parent}" -> "{child}";')
    return "\n".join(lines) + "\n}\n"


def to_mermaid(graph: Graph) -> str:
    ids = {nid: f"n{i}" for i, nid in enumerate(graph.nodes)}  # Mermaid ids must be plain words
    lines = ["flowchart TD"]
    for node in graph:
        head, text = _lines(node)
        label = f"{head}<br/>{text}".replace('"', "#quot;")
        shape = ('(["', '"])') if node.kind is NodeKind.AGGREGATE else ('["', '"]')
        lines.append(f"  {ids[node.id]}{shape[0]}{label}{shape[1]}")
    for parent, child in graph.edges():
        lines.append(f"  {ids[parent]} --> {ids[child]}")
    return "\n".join(lines) + "\n"
