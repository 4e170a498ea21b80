"""IR construction and the verifier's specific errors."""
import pytest

from compiler.build import RoutedSubQuery, add_query
from compiler.ir import AnswerType, Graph, Node, NodeKind, Query
from compiler.levels import topo_order
from compiler.verify import (AnswerTypeError, CycleError, MissingReferenceError, SinkError, UnknownExpertError,
                             verify)

EXPERTS = ["law", "medicine", "general", "aggregator"]


def two_step_graph() -> Graph:
    g = Graph()
    add_query(g, "q0", "Capital of France and its population?", [
        RoutedSubQuery(1, "What is the capital of France?", (), "general"),
        RoutedSubQuery(2, "How many people live in #1?", (1,), "general"),
    ], "aggregator")
    return g


def test_builder_turns_hash_refs_into_bound_references():
    g = two_step_graph()
    verify(g, EXPERTS)
    node = g.nodes["q0:2"]
    assert node.template == "How many people live in {#1}?"
    assert node.inputs == {"#1": "q0:1"}
    assert g.nodes["q0:agg"].kind is NodeKind.AGGREGATE
    assert g.nodes["q0:agg"].parents == ("q0:2",)  # a joined final answer reads the chain's last step
    assert topo_order(g) == ["q0:1", "q0:2", "q0:agg"]


def test_hash_without_dependency_stays_literal():
    g = Graph()
    add_query(g, "q0", "q", [RoutedSubQuery(1, "Is C# better than #2 pencils?", (), "general")], "aggregator")
    assert g.nodes["q0:1"].template == "Is C# better than #2 pencils?"
    verify(g, EXPERTS)


def test_multi_query_graph_topo_order_is_deterministic():
    g = two_step_graph()
    add_query(g, "q1", "Scurvy?", [RoutedSubQuery(1, "Which vitamin prevents scurvy?", (), "medicine")], "aggregator")
    verify(g, EXPERTS)
    assert topo_order(g) == ["q0:1", "q1:1", "q0:2", "q1:agg", "q0:agg"]  # waves, in insertion order
    assert "query q1 sink=q1:agg" in g.dump()


def test_cycle_names_its_nodes():
    g = Graph()
    g.add(Node("a", NodeKind.SUBQUERY, "x {#b}", "law", {"#b": "b"}))
    g.add(Node("b", NodeKind.SUBQUERY, "y {#a}", "law", {"#a": "a"}))
    with pytest.raises(CycleError) as err:
        verify(g)
    assert set(err.value.cycle) == {"a", "b"} and "->" in str(err.value)


def test_self_reference_is_a_cycle():
    g = Graph()
    g.add(Node("a", NodeKind.SUBQUERY, "x {#a}", "law", {"#a": "a"}))
    with pytest.raises(CycleError):
        verify(g)


def test_missing_reference_names_node_and_reference():
    g = Graph()
    g.add(Node("a", NodeKind.SUBQUERY, "uses {#7}", "law", {}))
    with pytest.raises(MissingReferenceError, match=r"node 'a': reference '#7'"):
        verify(g)
    g = Graph()
    g.add(Node("a", NodeKind.SUBQUERY, "uses {#7}", "law", {"#7": "ghost"}))
    with pytest.raises(MissingReferenceError, match="missing node 'ghost'"):
        verify(g)


def test_unknown_expert_lists_known_ones():
    g = two_step_graph()
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(expert="astrology")
    with pytest.raises(UnknownExpertError, match="unknown expert 'astrology'; known experts: aggregator, general"):
        verify(g, EXPERTS)


def test_answer_type_mismatch_names_edge():
    g = two_step_graph()
    g.nodes["q0:2"] = g.nodes["q0:2"].with_(accepts=frozenset({AnswerType.NUMBER}))
    with pytest.raises(AnswerTypeError, match="edge 'q0:1' -> 'q0:2'"):
        verify(g, EXPERTS)


def test_each_query_needs_exactly_one_aggregate_sink():
    g = two_step_graph()
    g.add(Node("orphan", NodeKind.SUBQUERY, "dangling", "law"))
    with pytest.raises(SinkError, match="feeds nothing"):
        verify(g)
    g = Graph()
    g.add(Node("s", NodeKind.SUBQUERY, "x", "law"))
    g.add_query(Query("q", "x", "s"))
    with pytest.raises(SinkError, match="not an aggregate"):
        verify(g)
