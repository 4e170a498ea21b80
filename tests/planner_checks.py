"""What every planner test asks of a decomposition, on any engine."""
from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import Graph
from compiler.verify import verify


def check_dag(d) -> None:
    """The decomposition compiles into a graph the IR verifier accepts."""
    graph = Graph()
    routed = [RoutedSubQuery(sq.index, sq.text, sq.depends_on, "general") for sq in d.subqueries]
    add_query(graph, "q0", d.query, routed, "aggregator", 16, final=FinalAnswer.join)
    verify(graph, known_experts=["general", "aggregator"])
    assert all(dep < sq.index for sq in d.subqueries for dep in sq.depends_on)
