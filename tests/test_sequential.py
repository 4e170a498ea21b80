"""The sequential baseline's semantics, with a scripted backend: order, answer filling, failures."""
from compiler.build import RoutedSubQuery, add_query
from compiler.ir import Graph
from compllm.backends.base import BackendError, Generation, ModelStats
from compllm.experts import Expert
from compllm.runtime.context import AGGREGATOR, ExecutionContext
from compllm.runtime.prompts import Aggregator
from compllm.runtime.sequential import SequentialExecutor


class ScriptedModel:
    """Answers by looking up the last user message; raises for prompts containing 'EXPLODE'."""

    def __init__(self):
        self.name, self.stats, self.prompts = "scripted", ModelStats(), []

    def generate(self, requests, max_live_rows=None):
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            self.prompts.append(user)
            if "Facts from experts" in user:
                answer = "final"
            elif "EXPLODE" in user:
                raise BackendError("boom")
            else:
                answer = "Paris" if "capital" in user else "about 2 million"
            out.append(Generation(answer, 10, 3, 0.01))
        return out


class FakePool:
    def __init__(self, model):
        self.model = model

    def get(self, alias):
        return self.model


def context(model):
    experts = {"general": Expert("general", "d", "default", "Be brief.")}
    return ExecutionContext(FakePool(model), experts, Aggregator("default", "Combine."))


def graph(second_text="How many people live in #1?"):
    g = Graph()
    add_query(g, "q0", "Capital of France and its population?", [
        RoutedSubQuery(1, "What is the capital of France?", (), "general"),
        RoutedSubQuery(2, second_text, (1,), "general"),
    ], AGGREGATOR)
    return g


def test_runs_in_topological_order_and_quotes_parent_answers():
    model = ScriptedModel()
    results = SequentialExecutor().run(graph(), context(model))
    assert [results[n].answer for n in ("q0:1", "q0:2", "q0:agg")] == ["Paris", "about 2 million", "final"]
    assert "How many people live in «Paris»?" in model.prompts[1]
    assert "«about 2 million»" in model.prompts[2] and "Facts from experts" in model.prompts[2]
    assert all(r.ok and r.end >= r.start for r in results.values())


def test_failed_node_skips_dependents_and_aggregator_answers_from_what_exists():
    g = Graph()
    add_query(g, "q0", "three parts", [
        RoutedSubQuery(1, "EXPLODE please", (), "general"),
        RoutedSubQuery(2, "Use #1", (1,), "general"),
        RoutedSubQuery(3, "What is the capital of France?", (), "general"),
    ], AGGREGATOR)
    model = ScriptedModel()
    results = SequentialExecutor().run(g, context(model))
    assert results["q0:1"].status == "failed" and "boom" in results["q0:1"].error
    assert results["q0:2"].status == "skipped" and "q0:1" in results["q0:2"].error
    assert results["q0:3"].answer == "Paris"
    assert results["q0:agg"].ok
    assert "(no answer: BackendError: boom)" in model.prompts[-1]


def test_single_subquery_passes_through_without_aggregation_call():
    g = Graph()
    add_query(g, "q0", "What is the capital of France?",
              [RoutedSubQuery(1, "What is the capital of France?", (), "general")], AGGREGATOR)
    model = ScriptedModel()
    results = SequentialExecutor().run(g, context(model))
    assert results["q0:agg"].answer == "Paris" and len(model.prompts) == 1
