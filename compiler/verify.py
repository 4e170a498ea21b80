"""Invariants of the IR, checked before and after every pass.

Each failure is its own exception type with a message that names the offending
nodes, so a broken decomposition or a buggy pass is diagnosed, never guessed at.
"""
from __future__ import annotations

from graphlib import CycleError as _GraphlibCycle
from graphlib import TopologicalSorter
from typing import Iterable

from compiler.ir import Graph, NodeKind
from compiler.levels import waves


class GraphError(ValueError):
    """Base class: the graph violates an IR invariant."""


class CycleError(GraphError):
    def __init__(self, cycle: list[str]):
        self.cycle = cycle
        super().__init__(f"dependency cycle: {' -> '.join(cycle)}")


class MissingReferenceError(GraphError):
    def __init__(self, node: str, ref: str, detail: str):
        self.node, self.ref = node, ref
        super().__init__(f"node {node!r}: reference {ref!r} {detail}")


class UnknownExpertError(GraphError):
    def __init__(self, node: str, expert: str, known: Iterable[str]):
        self.node, self.expert, self.known = node, expert, sorted(known)
        super().__init__(
            f"node {node!r} names unknown expert {expert!r}; known experts: {', '.join(self.known) or '(none)'}"
        )


class AnswerTypeError(GraphError):
    def __init__(self, parent: str, child: str, produced: str, accepted: Iterable[str]):
        super().__init__(
            f"edge {parent!r} -> {child!r}: {parent!r} answers {produced!r} but {child!r} accepts only "
            f"{', '.join(sorted(accepted))}"
        )


class SinkError(GraphError):
    pass


class GuardError(GraphError):
    """An escalate node without a guard, or a guard that does not read one of the node's parents."""


class FusionError(GraphError):
    """A part node (`Node.part_of`) that is not bound to the fused node answering for it."""


def verify(graph: Graph, known_experts: Iterable[str] | None = None) -> None:
    """Raise a specific GraphError on the first violated invariant."""
    _check_references(graph)
    _check_acyclic(graph)
    if known_experts is not None:
        _check_experts(graph, set(known_experts))
    _check_answer_types(graph)
    _check_parts(graph)
    _check_guards(graph)
    _check_sinks(graph)


def _check_references(graph: Graph) -> None:
    for node in graph:
        for ref in node.references():
            if ref not in node.inputs:
                raise MissingReferenceError(node.id, ref, "is used in the template but bound to no parent")
        for ref, parent in node.inputs.items():
            if parent not in graph.nodes:
                raise MissingReferenceError(node.id, ref, f"points to missing node {parent!r}")
            if parent == node.id:
                raise CycleError([node.id, node.id])


def _check_acyclic(graph: Graph) -> None:
    if _is_acyclic(graph):  # fast path (linear, no graphlib bookkeeping); graphlib only to name a cycle
        return
    try:
        TopologicalSorter({n.id: n.parents for n in graph}).prepare()
    except _GraphlibCycle as exc:
        # graphlib reports the cycle child-first, closed (first == last); show it in edge direction.
        raise CycleError(list(reversed(exc.args[1]))) from None


def _is_acyclic(graph: Graph) -> bool:
    """Linear-time check (Kahn, shared with the level computation); graphlib then only names a cycle."""
    try:
        waves(graph)
    except ValueError:
        return False
    return True


def _check_experts(graph: Graph, known: set[str]) -> None:
    for node in graph:
        if node.expert not in known:
            raise UnknownExpertError(node.id, node.expert, known)


def _check_answer_types(graph: Graph) -> None:
    for node in graph:
        if node.accepts is None:
            continue
        for parent_id in node.parents:
            produced = graph.nodes[parent_id].answer_type
            if produced not in node.accepts:
                raise AnswerTypeError(parent_id, node.id, produced.value, (a.value for a in node.accepts))


def _check_parts(graph: Graph) -> None:
    for node in graph:
        if node.part_of is None:
            continue
        fused = graph.nodes.get(node.part_of)
        if fused is None or node.id not in fused.fused_from:
            raise FusionError(f"node {node.id!r} is a part of {node.part_of!r}, which does not answer for it")
        if node.parents != (fused.id,) or node.kind is not NodeKind.SUBQUERY:
            raise FusionError(f"part node {node.id!r} must be a sub-query reading only {fused.id!r}")


def _check_guards(graph: Graph) -> None:
    for node in graph:
        if (node.kind is NodeKind.ESCALATE) != (node.guard is not None):
            raise GuardError(f"node {node.id!r}: an escalate node needs a guard and only escalate nodes have one "
                             f"(kind {node.kind.value}, guard {node.guard})")
        if node.guard is None:
            continue
        if node.guard.source not in node.parents:
            raise GuardError(f"node {node.id!r}: its guard reads {node.guard.source!r}, which is not one of its "
                             f"parents {list(node.parents)}")
        if not 0.0 <= node.guard.expected_rate <= 1.0:
            raise GuardError(f"node {node.id!r}: guard expected_rate {node.guard.expected_rate} is not in [0, 1]")


def _check_sinks(graph: Graph) -> None:
    children = graph.children()
    for query in graph.queries.values():
        sink = graph.nodes.get(query.sink)
        if sink is None:
            raise SinkError(f"query {query.id!r}: sink {query.sink!r} is not in the graph")
        if sink.kind is not NodeKind.AGGREGATE:
            raise SinkError(f"query {query.id!r}: sink {query.sink!r} is a {sink.kind.value} node, not an aggregate")
        if children.get(sink.id):
            raise SinkError(f"query {query.id!r}: sink {sink.id!r} has dependents {children[sink.id]}")
    sinks = {q.sink for q in graph.queries.values()}  # a set: one lookup per node keeps verify linear
    answers_for_others = set(graph.annotations.get("aliases", {}).values())  # deduplicated nodes' twins
    for node in graph:
        if node.kind is NodeKind.AGGREGATE and node.id not in sinks:
            raise SinkError(f"aggregate node {node.id!r} is the sink of no query")
        # a sub-query of a query still being planned (online: its sink comes last) may not feed anything yet
        still_open = node.provenance is not None and node.provenance.query_id not in graph.queries
        if node.kind is NodeKind.SUBQUERY and not children.get(node.id) and not still_open \
                and node.id not in answers_for_others:
            raise SinkError(f"sub-query node {node.id!r} feeds nothing: its answer would be lost")
