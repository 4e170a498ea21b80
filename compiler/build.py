"""Lift routed sub-queries into the IR: one sub-query node each, one aggregate sink per query."""
from __future__ import annotations

import re
from dataclasses import dataclass

from compiler.ir import AnswerType, Graph, Node, NodeKind, Provenance, Query

_HASH_REF = re.compile(r"#(\d+)\b")
CHARS_PER_TOKEN = 4  # rough prompt-size estimate until a tokenizer-based cost model replaces it


@dataclass(frozen=True)
class RoutedSubQuery:
    """What the frontend hands the compiler: a parsed sub-query plus its routing decision."""

    index: int
    text: str
    depends_on: tuple[int, ...]
    expert: str
    answer_type: str = "text"
    route_score: float | None = None
    routed_by: str = "router"
    max_new_tokens: int = 0


def node_id(query_id: str, index: int | str) -> str:
    return f"{query_id}:{index}"


def add_query(
    graph: Graph,
    query_id: str,
    text: str,
    subqueries: list[RoutedSubQuery],
    aggregator_expert: str,
    aggregator_max_new_tokens: int = 0,
) -> Query:
    """Append one query's nodes to `graph`; `#k` in a sub-query becomes the reference `{#k}`."""
    for sq in subqueries:
        deps = set(sq.depends_on)
        template = _HASH_REF.sub(lambda m: "{#%s}" % m.group(1) if int(m.group(1)) in deps else m.group(0), sq.text)
        graph.add(
            Node(
                id=node_id(query_id, sq.index),
                kind=NodeKind.SUBQUERY,
                template=template,
                expert=sq.expert,
                inputs={f"#{d}": node_id(query_id, d) for d in sorted(deps)},
                answer_type=AnswerType.parse(sq.answer_type),
                est_prompt_tokens=len(sq.text) // CHARS_PER_TOKEN + 1,
                est_output_tokens=sq.max_new_tokens,
                provenance=Provenance(query_id, sq.index, sq.route_score, sq.routed_by),
            )
        )
    sink = node_id(query_id, "agg")
    graph.add(
        Node(
            id=sink,
            kind=NodeKind.AGGREGATE,
            template=text,
            expert=aggregator_expert,
            inputs={f"#{sq.index}": node_id(query_id, sq.index) for sq in subqueries},
            est_prompt_tokens=len(text) // CHARS_PER_TOKEN + 1,
            est_output_tokens=aggregator_max_new_tokens,
            provenance=Provenance(query_id, None, None, "aggregator"),
        )
    )
    query = Query(query_id, text, sink)
    graph.add_query(query)
    return query
