"""The `prefix` pass: rows sharing an expert's prompt prefix are grouped within a call, the prefill an engine's
prefix cache saves is counted per call (once computed, a prefix is free for later calls of the same model), the
plan and `explain` show it and name the engines; engines without a prefix cache get the `batch` pass's calls
unchanged; a pipeline that schedules before the rows are final is refused."""
import pytest

from compiler import compile
from compiler.build import FinalAnswer, RoutedSubQuery as Sq, add_query
from compiler.config import CompilerConfig
from compiler.cost import CostModel, Engine, ModelCost
from compiler.explain import explain_text
from compiler.ir import Graph
from compiler.pass_manager import PipelineError, check_pipeline
from compiler.plan import Plan

PREFIX = {"law": 40, "medicine": 30, "aggregator": 50}


def workload() -> Graph:
    """Three queries; level 0: law and medicine rows interleaved, level 1: one law row reading a law answer."""
    g = Graph()
    add_query(g, "q0", "Two things?", [Sq(1, "What is a tort?", (), "law", max_new_tokens=8),
                                       Sq(2, "What is anemia?", (), "medicine", max_new_tokens=8),
                                       Sq(3, "Is #1 a crime?", (1,), "law", max_new_tokens=8)], "aggregator", 16)
    add_query(g, "q1", "Two more?", [Sq(1, "What is a lien?", (), "law", max_new_tokens=8),
                                     Sq(2, "What is a fever?", (), "medicine", max_new_tokens=8)], "aggregator", 16)
    add_query(g, "q2", "One?", [Sq(1, "What is a deed, in property law?", (), "law", max_new_tokens=8)],
              "aggregator", 16, final=FinalAnswer.join)
    return g


def cost(engine: Engine | None) -> CostModel:
    experts = {"law": "m", "medicine": "m", "aggregator": "m"}
    return CostModel({"m": ModelCost(10**6, 100, 1e-3, 1e-2)}, experts, prefix_tokens=dict(PREFIX),
                     engines={"m": engine} if engine else {})


def generates(plan: Plan):
    return [s for s in plan.steps if s.kind.value == "generate"]


def test_rows_of_one_expert_run_together_and_the_saved_prefill_is_counted():
    plain = compile(workload(), cost(Engine("llamacpp", left_padded=False)))
    plan = compile(workload(), cost(Engine("llamacpp", prefix_cache=True, left_padded=False)), CompilerConfig(dump=True))
    first, second = generates(plan)
    experts = [plan.graph.nodes[n].expert for n in first.nodes]
    assert experts == sorted(experts, key=experts.index)  # grouped: all law rows, then all medicine rows
    assert sorted(first.nodes) == sorted(generates(plain)[0].nodes)
    # level 0: 3 law rows and 2 medicine rows: each prefix computed once; level 1: law's prefix is still cached
    assert first.prefill_saved == 2 * PREFIX["law"] + 1 * PREFIX["medicine"]
    assert second.prefill_saved == PREFIX["law"] and plan.prefill_saved == 3 * 40 + 30
    assert first.est_s == pytest.approx(generates(plain)[0].est_s - first.prefill_saved * 1e-3)
    assert all(s.prefill_saved == 0 for s in generates(plain))
    text = explain_text(workload(), plan)
    assert "prefill saved by prefix caches: 150 prompt tokens" in text and "m=llamacpp, prefix cache" in text
    assert "prefill saved 110" in text and "m/law x3 (40 tokens)" in text
    again = Plan.from_json(plan.to_json())
    assert [s.prefill_saved for s in again.steps] == [s.prefill_saved for s in plan.steps]
    assert again.engines == {"m": "llamacpp, prefix cache"}


def test_an_engine_without_a_prefix_cache_keeps_the_batch_pass_calls():
    base = CompilerConfig(passes=["dedupe", "fuse", "batch", "schedule", "residency"])
    for engine in (None, Engine("hf"), Engine("openai", concurrency=4)):
        with_pass, without = compile(workload(), cost(engine)), compile(workload(), cost(engine), base)
        assert [(s.nodes, s.est_s) for s in generates(with_pass)] == [(s.nodes, s.est_s) for s in generates(without)]
        assert with_pass.prefill_saved == 0


def test_prefix_must_run_before_the_schedule():
    with pytest.raises(PipelineError, match="'prefix' runs after 'schedule' and invalidates its 'schedule'"):
        check_pipeline(["batch", "schedule", "prefix", "residency"])
    with pytest.raises(PipelineError, match="pass 'prefix' needs 'batches'"):
        check_pipeline(["prefix", "batch", "schedule", "residency"])


def test_engine_and_prefix_facts_round_trip_and_are_checked():
    cm = cost(Engine("openai", prefix_cache=True, concurrency=8))
    assert CostModel.from_calibration(cm.to_dict()) == cm
    from compiler.errors import ConfigError
    with pytest.raises(ConfigError, match="concurrency must be >= 1"):
        Engine("openai", concurrency=0)
    with pytest.raises(ConfigError, match="engines names model"):
        CostModel({"m": ModelCost(1, 1, 1e-3, 1e-3)}, {"law": "m"}, engines={"x": Engine()})
