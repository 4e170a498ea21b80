"""Graph <-> plain JSON-able dicts, so a Plan file carries the exact nodes it schedules.

Order is preserved everywhere (node order, input-label order: both reach prompts), and nothing is
sorted or defaulted away, so `graph_from_dict(graph_to_dict(g))` rebuilds an equal graph.
Annotations are not serialized: the plan itself is their lowered form.
"""
from __future__ import annotations

from typing import Any, Mapping

from compiler.ir import AnswerType, Graph, Guard, HostOp, Node, NodeKind, Provenance, Query


def node_to_dict(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": node.id,
        "kind": node.kind.value,
        "template": node.template,
        "expert": node.expert,
        "inputs": dict(node.inputs),
        "answer_type": node.answer_type.value,
        "accepts": None if node.accepts is None else sorted(a.value for a in node.accepts),
        "est_prompt_tokens": node.est_prompt_tokens,
        "est_output_tokens": node.est_output_tokens,
        "provenance": None,
    }
    if node.provenance is not None:
        p = node.provenance
        out["provenance"] = {"query_id": p.query_id, "subquery_index": p.subquery_index,
                             "route_score": p.route_score, "routed_by": p.routed_by}
    if node.fused_from:
        out["fused_from"] = list(node.fused_from)
    if node.part_of is not None:
        out["part_of"] = node.part_of
    if node.host is not None:
        out["host"] = node.host.value
    if node.model:
        out["model"] = node.model
    if node.guard is not None:
        g = node.guard
        out["guard"] = {"source": g.source, "threshold": g.threshold, "expected_rate": g.expected_rate}
    return out


def node_from_dict(data: Mapping[str, Any]) -> Node:
    prov = data.get("provenance")
    accepts = data.get("accepts")
    return Node(
        id=data["id"],
        kind=NodeKind(data["kind"]),
        template=data["template"],
        expert=data["expert"],
        inputs=dict(data.get("inputs", {})),
        answer_type=AnswerType(data.get("answer_type", "text")),
        accepts=None if accepts is None else frozenset(AnswerType(a) for a in accepts),
        est_prompt_tokens=data.get("est_prompt_tokens", 0),
        est_output_tokens=data.get("est_output_tokens"),
        provenance=None if prov is None else Provenance(**prov),
        fused_from=tuple(data.get("fused_from", ())),
        part_of=data.get("part_of"),
        host=HostOp(data["host"]) if data.get("host") else None,
        model=data.get("model", ""),
        guard=Guard(**data["guard"]) if data.get("guard") else None,
    )


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    return {
        "queries": [{"id": q.id, "text": q.text, "sink": q.sink} for q in graph.queries.values()],
        "nodes": [node_to_dict(n) for n in graph.nodes.values()],
    }


def graph_from_dict(data: Mapping[str, Any]) -> Graph:
    graph = Graph()
    for n in data.get("nodes", []):
        graph.add(node_from_dict(n))
    for q in data.get("queries", []):
        graph.add_query(Query(q["id"], q["text"], q["sink"]))
    return graph
