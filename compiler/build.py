"""Lift routed sub-queries into the IR: one sub-query node each, one aggregate sink per query.

An expert with a knowledge source also gets a `retrieve` node per sub-query: the same question (parents'
answers filled in when it runs) looked up in the source, whose passages the sub-query node reads (input
`PASSAGES_LABEL`). The compiler then schedules lookups like any other work (batched, costed, traced).

This is where input enters the compiler, so it checks everything before touching the graph: an input
that cannot form a valid query (too many sub-queries, an over-long text, a reference to a sub-query that
does not exist or to itself, a cycle, a duplicate id) raises a specific `BuildError` and leaves the graph
unchanged, so one bad query never leaves half a query behind in a batch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Mapping
from graphlib import CycleError as _GraphlibCycle
from graphlib import TopologicalSorter

from compiler.ir import REFERENCE, AnswerType, Graph, HostOp, Node, NodeKind, Provenance, Query
from compiler.verify import CycleError, GraphError

_HASH_REF = re.compile(r"#(\d+)\b")
CHARS_PER_TOKEN = 4  # rough prompt-size estimate until a tokenizer-based cost model replaces it


@dataclass(frozen=True)
class BuildLimits:
    """Caps on one query's input; the pipeline sets them from the decomposer's caps."""

    max_subqueries: int = 64
    max_chars: int = 20_000  # per text: the query and each sub-query


class FinalAnswer(str, Enum):
    """How a query's final answer (its aggregate node) is made; decided here, so the plan knows every call."""

    join = "join"  # the answers of the parts nothing else reads, unchanged and in order; no model call
    model = "model"  # the aggregator model writes it from every part's answer
    # every part's answer, in order, no model call: numbered questions, where the user asked each part (a part
    # another part reads is still an answer they want)
    every = "every"


class BuildError(GraphError):
    """The input cannot form a valid query graph; the message names the query, the sub-query and the fix."""


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
    max_new_tokens: int | None = None  # None: unknown (the cost model's default output length)


#: The input label under which a sub-query node reads its retrieve node's passages.
PASSAGES_LABEL = "passages"


@dataclass(frozen=True)
class Retrieval:
    """An expert's knowledge source as the compiler sees it: which index, how many passages, how long each."""

    source: str
    k: int = 2
    max_chars: int = 500

    @property
    def est_tokens(self) -> int:
        return self.k * (self.max_chars // CHARS_PER_TOKEN + 8)  # + title and quoting


def node_id(query_id: str, index: int | str) -> str:
    return f"{query_id}:{index}"


def add_query(
    graph: Graph,
    query_id: str,
    text: str,
    subqueries: list[RoutedSubQuery],
    aggregator_expert: str,
    aggregator_max_new_tokens: int | None = None,
    limits: BuildLimits = BuildLimits(),
    final: FinalAnswer = FinalAnswer.join,
    knowledge: Mapping[str, Retrieval] | None = None,
) -> Query:
    """Append one query's nodes to `graph`; `#k` in a sub-query becomes the reference `{#k}`.

    The aggregate sink reads every part when a model writes the final answer (`FinalAnswer.model`); a joined
    final answer reads only the parts no other part reads (the answers a chain of steps leads to), and is a
    host node: no model call, nothing for the aggregator to invent or drop.

    Raises BuildError (or CycleError) without changing `graph` when the input is invalid or over `limits`.
    """
    subqueries = list(subqueries)
    _check(graph, query_id, text, subqueries, limits)
    for sq in subqueries:
        for node in subquery_nodes(query_id, sq, knowledge):
            graph.add(node)
    sink = graph.add(aggregate_node(query_id, text, subqueries, aggregator_expert, aggregator_max_new_tokens, final))
    query = Query(query_id, text, sink.id)
    graph.add_query(query)
    return query


def subquery_node(query_id: str, sq: RoutedSubQuery) -> Node:
    """One sub-query's node (checked input: see `add_query`, or `check_subquery` when parts arrive one by one)."""
    deps = set(sq.depends_on)
    template = _HASH_REF.sub(lambda m: "{#%s}" % m.group(1) if int(m.group(1)) in deps else m.group(0),
                             _literal(sq.text))
    answer_type = AnswerType.parse(sq.answer_type)
    return Node(
        id=node_id(query_id, sq.index),
        kind=NodeKind.SUBQUERY,
        template=template,
        expert=sq.expert,
        inputs={f"#{d}": node_id(query_id, d) for d in sorted(deps)},
        answer_type=answer_type,
        est_prompt_tokens=len(sq.text) // CHARS_PER_TOKEN + 1,
        # CHOICE: the answer is one scored option letter, no decoding
        est_output_tokens=1 if answer_type is AnswerType.CHOICE else sq.max_new_tokens,
        provenance=Provenance(query_id, sq.index, sq.route_score, sq.routed_by),
    )


def subquery_nodes(query_id: str, sq: RoutedSubQuery, knowledge: Mapping[str, Retrieval] | None = None) -> list[Node]:
    """The sub-query's node, preceded by its retrieve node when its expert has a knowledge source."""
    node = subquery_node(query_id, sq)
    retrieval = (knowledge or {}).get(sq.expert)
    if retrieval is None:
        return [node]
    lookup = Node(
        id=node_id(query_id, f"r{sq.index}"),
        kind=NodeKind.RETRIEVE,
        template=node.template,  # the same question; parents' answers are filled in before the lookup
        expert=sq.expert,
        inputs=dict(node.inputs),
        answer_type=AnswerType.PASSAGES,
        est_prompt_tokens=0,
        est_output_tokens=retrieval.est_tokens,
        provenance=Provenance(query_id, sq.index, sq.route_score, "knowledge"),
    )
    return [lookup, node.with_(inputs={**node.inputs, PASSAGES_LABEL: lookup.id})]


def aggregate_node(query_id: str, text: str, subqueries: list[RoutedSubQuery], aggregator_expert: str,
                   aggregator_max_new_tokens: int | None, final: FinalAnswer) -> Node:
    """The query's sink: its final answer, joined on the host from the parts nothing else reads, or written by
    the aggregator model from every part."""
    joined = final in (FinalAnswer.join, FinalAnswer.every)
    read = {d for sq in subqueries for d in sq.depends_on} if final is FinalAnswer.join else set()
    return Node(
        id=node_id(query_id, "agg"),
        kind=NodeKind.AGGREGATE,
        template=_literal(text),
        expert=aggregator_expert,
        inputs={f"#{sq.index}": node_id(query_id, sq.index) for sq in subqueries if sq.index not in read},
        est_prompt_tokens=len(text) // CHARS_PER_TOKEN + 1,
        est_output_tokens=0 if joined else aggregator_max_new_tokens,
        host=HostOp.JOIN if joined else None,
        provenance=Provenance(query_id, None, None, "aggregator"),
    )


def check_subquery(query_id: str, sq: RoutedSubQuery, earlier: set[int], limits: BuildLimits = BuildLimits()) -> None:
    """A part arriving on its own (a streaming planner): valid, and reading only parts that arrived before it."""
    label = f"query {query_id!r}, sub-query {sq.index}"
    if isinstance(sq.index, bool) or not isinstance(sq.index, int) or sq.index < 1 or sq.index in earlier:
        raise BuildError(f"{label}: index must be a new integer >= 1")
    if len(earlier) >= limits.max_subqueries:
        raise BuildError(f"{label}: over the cap of {limits.max_subqueries} sub-queries (decomposer.max_subqueries)")
    _check_text(label, sq.text, limits)
    for dep in sq.depends_on:
        if dep not in earlier:
            raise BuildError(f"{label} depends on {dep!r}, which is not an earlier sub-query of this query")


def _literal(text: str) -> str:
    """Text never holds IR references of its own: a literal `{#x}` keeps only `#x` (still a `#k` reference)."""
    return REFERENCE.sub(lambda m: m.group(1), text)


def _check(graph: Graph, query_id: str, text: str, subqueries: list[RoutedSubQuery], limits: BuildLimits) -> None:
    where = f"query {query_id!r}"
    if not isinstance(query_id, str) or not query_id.strip():
        raise BuildError(f"query id {query_id!r} must be a non-empty string")
    if query_id in graph.queries or node_id(query_id, "agg") in graph.nodes:
        raise BuildError(f"{where} is already in the graph; give every query its own id")
    _check_text(f"{where}: the query text", text, limits)
    if not subqueries:
        raise BuildError(f"{where} has no sub-queries; answer it unsplit as sub-query 1")
    if len(subqueries) > limits.max_subqueries:
        raise BuildError(f"{where} has {len(subqueries)} sub-queries, over the cap of {limits.max_subqueries} "
                         f"(decomposer.max_subqueries)")
    indices = []
    for sq in subqueries:
        if not isinstance(sq, RoutedSubQuery):
            raise BuildError(f"{where}: expected RoutedSubQuery items, got {type(sq).__name__}")
        if isinstance(sq.index, bool) or not isinstance(sq.index, int) or sq.index < 1:
            raise BuildError(f"{where}: sub-query index {sq.index!r} must be an integer >= 1")
        indices.append(sq.index)
    if len(set(indices)) != len(indices):
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        raise BuildError(f"{where}: sub-query index(es) {dupes} used more than once; number them 1..n")
    taken = [nid for nid in (node_id(query_id, i) for i in indices) if nid in graph.nodes]
    if taken:
        raise BuildError(f"{where}: node id(s) {taken[:3]} are already in the graph; give the query another id")
    known = set(indices)
    for sq in subqueries:
        label = f"{where}, sub-query {sq.index}"
        _check_text(label, sq.text, limits)
        if not isinstance(sq.expert, str) or not sq.expert.strip():
            raise BuildError(f"{label}: expert {sq.expert!r} must be a non-empty name")
        tokens = sq.max_new_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise BuildError(f"{label}: max_new_tokens {tokens!r} must be an integer >= 0 or None")
        for dep in sq.depends_on:
            if isinstance(dep, bool) or not isinstance(dep, int) or dep not in known:
                raise BuildError(f"{label} depends on {dep!r}, which is not a sub-query of this query "
                                 f"(known: {sorted(known)})")
            if dep == sq.index:
                raise BuildError(f"{label} depends on itself")
    try:
        TopologicalSorter({sq.index: tuple(sq.depends_on) for sq in subqueries}).prepare()
    except _GraphlibCycle as exc:
        raise CycleError([node_id(query_id, i) for i in reversed(exc.args[1])]) from None


def _check_text(label: str, text: object, limits: BuildLimits) -> None:
    if not isinstance(text, str) or not text.strip():
        raise BuildError(f"{label} must be non-empty text, got {str(text)[:40]!r}")
    if len(text) > limits.max_chars:
        raise BuildError(f"{label} is {len(text):,} chars, over the cap of {limits.max_chars:,}; shorten it "
                         f"(the decomposer cuts queries at decomposer.max_query_chars)")
