"""Golden tests: explain's text and the Graphviz/Mermaid views of a fixed two-query graph."""
import os
from pathlib import Path

from compiler import CompilerConfig, CostModel, ModelCost, compile
from compiler.build import RoutedSubQuery, add_query
from compiler.explain import explain_text
from compiler.ir import Graph
from compiler.render import to_dot, to_mermaid

GOLDEN = Path(__file__).parent / "golden"
GiB = 2**30


def fixed_graph() -> Graph:
    g = Graph()
    add_query(g, "q0", "Who was UK prime minister when the Berlin Wall fell, and what is 15% of 240?", [
        RoutedSubQuery(1, "In what year did the Berlin Wall fall?", (), "general", max_new_tokens=16),
        RoutedSubQuery(2, "Who was the British prime minister in #1?", (1,), "general", max_new_tokens=16),
        RoutedSubQuery(3, "What is 15% of 240?", (), "math", max_new_tokens=32),
    ], "aggregator", 64)
    add_query(g, "q1", "What is 15% of 240, and which vitamin prevents scurvy?", [
        RoutedSubQuery(1, "What is 15% of 240?", (), "math", max_new_tokens=32),
        RoutedSubQuery(2, "Which vitamin prevents scurvy?", (), "medicine", max_new_tokens=16),
    ], "aggregator", 64)
    return g


def fixed_cost() -> CostModel:
    small = ModelCost(weight_bytes=1 * GiB, kv_bytes_per_token=12_288, prefill_s_per_token=0.001,
                      decode_s_per_token=0.05, load_s=2.0)
    big = ModelCost(weight_bytes=3 * GiB, kv_bytes_per_token=28_672, prefill_s_per_token=0.003,
                    decode_s_per_token=0.15, load_s=5.0)
    return CostModel(models={"small": small, "big": big},
                     expert_model={"general": "small", "math": "big", "medicine": "small", "aggregator": "small"})


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("COMPLLM_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; COMPLLM_UPDATE_GOLDEN=1 rewrites it"


def test_explain_text_is_stable():
    graph = fixed_graph()
    plan = compile(graph, fixed_cost(), CompilerConfig(memory_budget=int(3.5 * GiB), dump=True))
    text = explain_text(graph, plan)
    assert "== IR after dedupe" in text and "alias q1:1 -> q0:3" in text  # shared sub-query computed once
    assert "evict" in text  # 1 + 3 GiB models cannot both stay under 3.5 GiB
    check_golden("explain.txt", text)


def test_dot_and_mermaid_are_stable():
    graph = fixed_graph()
    dot, mmd = to_dot(graph), to_mermaid(graph)
    assert dot.count("->") == len(list(graph.edges())) and mmd.count("-->") == len(list(graph.edges()))
    check_golden("graph.dot", dot)
    check_golden("graph.mmd", mmd)
