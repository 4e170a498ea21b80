"""compile() end to end: plan properties on random DAGs, determinism, goldens, Belady vs LRU, errors."""
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compiler import CompilerConfig, CostModel, ModelCost, Plan, StepKind, compile
from compiler.build import FinalAnswer
from compiler.build import RoutedSubQuery as Sq
from compiler.build import add_query
from compiler.errors import ConfigError, MemoryBudgetError
from compiler.ir import AnswerType, Graph
from compiler.plan_verify import PlanError, replay_memory
from compiler.synthetic import random_cost_model, random_graph
from compiler.verify import AnswerTypeError, CycleError, MissingReferenceError, UnknownExpertError

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- random workloads -------------------------------------------------------------------------------

@st.composite
def workloads(draw, uniform: bool = False, tight: bool = False):
    """(graph, cost model, config): up to ~350 nodes, 1-5 models, a budget >= what the largest model needs
    (`tight`: 2-5 models, 2-8 experts and exactly that budget, so residency planning must evict)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    experts = [f"e{i}" for i in range(draw(st.integers(2 if tight else 1, 8)))]
    n_models = draw(st.integers(2 if tight else 1, 5))
    cm = random_cost_model(rng, experts, n_models, uniform=uniform)
    graph = random_graph(rng, experts, n_queries=draw(st.integers(1, 50)), min_sub=1, max_sub=6,
                         shared_prob=draw(st.floats(0, 0.6)), shared_pool=3)
    config = CompilerConfig(
        max_batch_size=draw(st.integers(1, 10)),
        max_call_size=draw(st.sampled_from([None, 4, 64])),
        residency=draw(st.sampled_from(["belady", "lru"])),
        streams=draw(st.integers(1, 3)),
        fuse=draw(st.sampled_from([[], ["chains"]])),
    )
    # smallest feasible budget: a model's weights + its largest node's KV, measured on the graph after the
    # budget-independent rewrites (dedupe/fuse change prompts), so compile once without a budget
    compiled = compile(graph, cm, config).graph
    floor = max(cm.cost(cm.model_of(n)).weight_bytes + cm.batch_bytes(cm.model_of(n), [cm.node_tokens(n, compiled)])
                for n in compiled if n.needs_model)
    total = sum(mc.weight_bytes for mc in cm.models.values())
    if uniform:  # equal footprints (no KV): the budget holds k models, the classic caching setting
        config.memory_budget = floor * draw(st.integers(1, max(1, n_models - 1)))
    else:
        config.memory_budget = floor if tight else draw(
            st.one_of(st.none(), st.just(floor), st.integers(floor, floor + total // 2)))
    return graph, cm, config


def check_plan(plan: Plan, original: Graph, cm: CostModel, budget) -> None:
    """`Plan.verify()` (the production checker: coverage, order, streams, memory in plan order and in random
    execution orders), plus what only a test knows: the original graph and the budget it was compiled for."""
    plan.verify(cm, orders=3)
    graph = plan.graph
    fused = {orig for n in graph for orig in n.fused_from}
    for nid in original.nodes:  # every original node is answered: kept (maybe as a part), deduped, or fused
        target = plan.aliases.get(nid, nid)
        assert target in graph.nodes or target in fused, nid
    assert not set(plan.aliases) & set(graph.nodes)
    assert all(q.sink in graph.nodes for q in graph.queries.values())
    assert replay_memory(plan, plan.steps) == plan.peak_planned_bytes
    if budget is not None:
        assert plan.peak_planned_bytes <= budget
    assert plan.critical_path_s() <= plan.estimated_span_s() + 1e-9


@PROPERTY
@given(st.one_of(workloads(), workloads(tight=True)))
def test_plans_on_random_dags_are_complete_ordered_and_within_budget(workload):
    graph, cm, config = workload
    before = graph.dump()
    config.verify = False  # the plan is checked here, not by compile()
    plan = compile(graph, cm, config)
    check_plan(plan, graph, cm, config.memory_budget)
    event(f"evicts: {'yes' if plan.count(StepKind.EVICT) else 'no'}")
    event(f"dedupe: {'yes' if plan.aliases else 'no'}")
    event(f"fused: {'yes' if any(n.fused_from for n in plan.graph) else 'no'}")
    event(f"nodes > 100: {len(graph) > 100}")
    assert graph.dump() == before, "compile never mutates its input"


@PROPERTY
@given(workloads())
def test_plan_json_is_deterministic_and_round_trips(workload):
    graph, cm, config = workload
    text = compile(graph, cm, config).to_json()
    assert compile(graph, cm, config).to_json() == text
    back = Plan.from_json(text)
    assert back.to_json() == text
    assert back.graph.dump() == compile(graph, cm, config).graph.dump()


@PROPERTY
@given(st.one_of(workloads(uniform=True), workloads(uniform=True, tight=True)))
def test_belady_never_loads_more_than_lru_for_equal_sizes(workload):
    graph, cm, config = workload
    config.fuse = []
    belady = compile(graph, cm, CompilerConfig(**{**vars(config), "residency": "belady"}))
    lru = compile(graph, cm, CompilerConfig(**{**vars(config), "residency": "lru"}))
    assert belady.loads <= lru.loads
    event(f"belady saves loads: {belady.loads < lru.loads}")


def test_belady_strictly_fewer_loads_on_a_constructed_case():
    # one query whose chain alternates three equal models a b c a b c, aggregated on a: budget holds two models
    cm = CostModel({m: ModelCost(100, 0, 1e-3, 1e-2) for m in "abc"},
                   {"ea": "a", "eb": "b", "ec": "c", "aggregator": "a"})
    g = Graph()
    experts = ["ea", "eb", "ec"] * 2
    add_query(g, "q", "cyclic", [Sq(i + 1, f"step {i} #{i}" if i else "start", (i,) if i else (), e)
                                 for i, e in enumerate(experts)], "aggregator", final=FinalAnswer.model)
    loads = {ev: compile(g, cm, CompilerConfig(memory_budget=200, residency=ev)).loads for ev in ("belady", "lru")}
    assert loads == {"belady": 5, "lru": 7}


# --- goldens ----------------------------------------------------------------------------------------

def golden_graph() -> Graph:
    g = Graph()
    add_query(g, "q0", "What is the capital of France and how many people live there?", [
        Sq(1, "What is the capital of France?", (), "general", max_new_tokens=8),
        Sq(2, "How many people live in #1?", (1,), "law", max_new_tokens=8)], "aggregator", 16,
        final=FinalAnswer.model)
    add_query(g, "q1", "What is the capital of France, and what is 2+2?", [
        Sq(1, "What is the capital of France?", (), "general", max_new_tokens=8),
        Sq(2, "What is 2+2?", (), "math", max_new_tokens=8)], "aggregator", 16, final=FinalAnswer.model)
    add_query(g, "q2", "Is the Seine longer than the Loire?", [
        Sq(1, "How long is the Seine?", (), "math", max_new_tokens=8)], "aggregator", 16)
    return g


def golden_cost() -> CostModel:
    return CostModel({"small": ModelCost(1000, 2, 1e-3, 1e-2), "big": ModelCost(3000, 4, 2e-3, 2e-2, load_s=1.5)},
                     {"general": "small", "math": "small", "law": "big", "aggregator": "big"}, load_bytes_per_s=1e4)


GOLDEN_GRAPH = """\
query q0 sink=q0:agg: 'What is the capital of France and how many people live there?'
query q1 sink=q1:agg: 'What is the capital of France, and what is 2+2?'
query q2 sink=q2:agg: 'Is the Seine longer than the Loire?'
  q0:1 [subquery] expert=general type=text: 'What is the capital of France?'
  q0:2 [subquery] expert=law type=text inputs(#1=q0:1): 'How many people live in {#1}?'
  q0:agg [aggregate] expert=aggregator type=text inputs(#1=q0:1, #2=q0:2): 'What is the capital of France and how many people live there?'
  q1:2 [subquery] expert=math type=text: 'What is 2+2?'
  q1:agg [aggregate] expert=aggregator type=text inputs(#1=q0:1, #2=q1:2): 'What is the capital of France, and what is 2+2?'
  q2:1 [subquery] expert=math type=text: 'How long is the Seine?'
  q2:agg [aggregate] expert=aggregator type=text inputs(#1=q2:1) host(join): 'Is the Seine longer than the Loire?'"""

GOLDEN_PLAN = """\
plan steps=8 loads=2 budget=3,500 peak=3,352 residency=belady streams=1
  footprint small=1,056
  footprint big=3,352
  alias q1:1 -> q0:1
  [1] load:small#0: load small | held=1,056
  [0] gen:small#0: generate small (q1:2, q2:1) after load:small#0 | held=1,056
  [2] host:q2:agg: host (q2:agg) after gen:small#0 | held=1,056
  [0] gen:small#1: generate small (q0:1) after load:small#0 | held=1,056
  [1] evict:small#0: evict small after load:small#0, gen:small#0, gen:small#1 | held=0
  [1] load:big#0: load big after evict:small#0 | held=3,352
  [0] gen:big#0: generate big (q0:2, q1:agg) after load:big#0, gen:small#1, gen:small#0 | held=3,352
  [0] gen:big#1: generate big (q0:agg) after load:big#0, gen:small#1, gen:big#0 | held=3,352"""


def test_golden_graph_and_plan_text():
    plan = compile(golden_graph(), golden_cost(),
                   CompilerConfig(memory_budget=3500, max_batch_size=2, max_call_size=None))
    assert plan.graph.dump() == GOLDEN_GRAPH
    assert plan.dump() == GOLDEN_PLAN
    # small: 1000 B weights + its largest batch (the two shortest prompts together: 2 x (6 + 8) tokens x 2 B) = 1056
    assert plan.footprints == {"small": 1056, "big": 3352}
    # load small 0.1 s; two small batches; load big 1.5 s; then the big batches (q0:agg after gen:big#0); q2's
    # final answer is joined on the host (a single part: no aggregator call), so it costs nothing
    assert plan.critical_path_s() == pytest.approx(2.532)
    assert plan.estimated_span_s() == pytest.approx(2.62)
    assert plan.memory_profile()[4] == ("evict:small#0", 0, 1056)  # held until the eviction ends


def test_report_has_timings_and_optional_dumps():
    plan = compile(golden_graph(), golden_cost(), CompilerConfig(dump=True))
    report = plan.report
    assert list(report.pass_seconds) == ["dedupe", "fuse", "retrieve", "batch", "prefix", "schedule", "place",
                                         "residency"]
    assert report.total_seconds >= report.lower_seconds >= 0
    assert [name for name, _ in report.dumps] == ["input", "dedupe", "fuse", "retrieve", "batch", "prefix", "schedule",
                                                  "residency"]
    assert compile(golden_graph(), golden_cost()).report.dumps == []
    assert plan.loads == 2 and plan.count(StepKind.EVICT) == 0  # unlimited budget: load once, never evict


def test_every_ablation_still_gives_a_valid_plan():
    g = golden_graph()
    for changes in ({"disabled": ["dedupe"]}, {"disabled": ["dedupe", "fuse"]}, {"residency": "lru"},
                    {"max_batch_size": 1, "max_call_size": 1}, {"passes": ["batch", "schedule", "residency"]}):
        plan = compile(g, golden_cost(), CompilerConfig(memory_budget=3500, **changes))
        check_plan(plan, g, golden_cost(), 3500)
    no_batch = compile(g, golden_cost(), CompilerConfig(max_batch_size=1, max_call_size=1))
    assert all(len(s.nodes) == 1 for s in no_batch.steps if s.kind is StepKind.GENERATE)
    assert "q1:1" in compile(g, golden_cost(), CompilerConfig(disabled=["dedupe"])).graph.nodes


def test_streams_assign_models_round_robin():
    plan = compile(golden_graph(), golden_cost(), CompilerConfig(streams=2))
    assert {s.model: s.stream for s in plan.steps if s.kind is StepKind.GENERATE} == {"small": 0, "big": 1}
    assert {s.stream for s in plan.steps if s.kind is StepKind.LOAD} == {2}


# --- errors -----------------------------------------------------------------------------------------

def test_budget_below_a_models_weights_names_bytes():
    with pytest.raises(MemoryBudgetError) as err:
        compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=2000))
    msg = str(err.value)
    assert "model 'big' needs" in msg and "budget is 2,000 bytes" in msg and "weights 3,000" in msg
    assert err.value.budget_bytes == 2000 and err.value.needed_bytes > 3000


def test_budget_too_small_for_the_largest_node_names_its_bytes():
    expected = (r"model 'big' needs 3,192 bytes \(runtime base 0 \+ weights 3,000 \+ KV and workspace 192 for node "
                r"'q0:agg' alone\)")
    with pytest.raises(MemoryBudgetError, match=expected):
        compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=3050, max_batch_size=1, max_call_size=1))


def test_verifier_errors_pass_through_compile_unchanged():
    cm = golden_cost()
    g = golden_graph()
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(inputs={"#2": "q0:2"}, template="{#2}")
    with pytest.raises(CycleError, match="dependency cycle"):
        compile(g, cm)
    g = golden_graph()
    g.nodes["q0:2"] = g.nodes["q0:2"].with_(inputs={"#1": "ghost"})
    with pytest.raises(MissingReferenceError, match="missing node 'ghost'"):
        compile(g, cm)
    g = golden_graph()
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(expert="astrology")
    with pytest.raises(UnknownExpertError, match="unknown expert 'astrology'"):
        compile(g, cm)
    g = golden_graph()
    g.nodes["q0:2"] = g.nodes["q0:2"].with_(accepts=frozenset({AnswerType.NUMBER}))
    with pytest.raises(AnswerTypeError, match="edge 'q0:1' -> 'q0:2'"):
        compile(g, cm)


def test_empty_graph_compiles_to_an_empty_plan():
    plan = compile(Graph(), golden_cost(), CompilerConfig(memory_budget=10))
    assert plan.steps == [] and plan.peak_planned_bytes == 0 and plan.estimated_span_s() == 0.0
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_bad_config_is_a_config_error():
    for bad in ({"residency": "fifo"}, {"max_batch_size": 0}, {"max_call_size": 0}, {"memory_budget": 0},
                {"streams": 0}):
        with pytest.raises(ConfigError):
            compile(golden_graph(), golden_cost(), CompilerConfig(**bad))


def test_calls_past_max_batch_size_refill_rows_and_reserve_kv_for_live_rows_only():
    """max_call_size > max_batch_size: one call carries the whole level, max_batch_size rows decode at once, and
    the model's footprint reserves KV for those live rows only."""
    refill = compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=3500, max_batch_size=1, max_call_size=3))
    (call,) = [s for s in refill.steps if s.kind is StepKind.GENERATE and s.model == "small"]
    assert (call.nodes, call.slots) == (("q1:2", "q2:1", "q0:1"), 1)
    assert "(q1:2, q2:1, q0:1) 1 at a time" in refill.dump()
    assert Plan.from_json(refill.to_json()).steps == refill.steps
    pairs = compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=3500, max_batch_size=2,
                                                                  max_call_size=None))
    assert refill.footprints["small"] < pairs.footprints["small"]


def test_a_joined_final_answer_in_a_multi_model_plan_loads_nothing_it_does_not_call():
    """The review's case: numbered (LIST) and single-part (skip_single) aggregates with the aggregator on a second
    model. They need no call, so the plan never loads that model, and a budget too small for it still compiles."""
    cm = CostModel({"small": ModelCost(1000, 2, 1e-3, 1e-2), "agg": ModelCost(3000, 4, 1e-3, 1e-2)},
                   {"general": "small", "aggregator": "agg"})
    g = Graph()
    add_query(g, "q0", "1. a? 2. b?", [Sq(1, "a?", (), "general"), Sq(2, "b?", (), "general")], "aggregator", 64)
    add_query(g, "q1", "just one?", [Sq(1, "just one?", (), "general")], "aggregator", 64)
    plan = compile(g, cm, CompilerConfig(memory_budget=2000))
    assert {s.model for s in plan.steps if s.kind in (StepKind.LOAD, StepKind.GENERATE)} == {"small"}
    assert [s.nodes for s in plan.steps if s.kind is StepKind.HOST] == [("q0:agg",), ("q1:agg",)]
    assert "agg" not in plan.footprints and plan.peak_planned_bytes < 2000
    synthesized = Graph()
    add_query(synthesized, "q0", "a and b?", [Sq(1, "a?", (), "general"), Sq(2, "b?", (), "general")], "aggregator",
              64, final=FinalAnswer.model)
    with pytest.raises(MemoryBudgetError, match="model 'agg'"):  # a real aggregator call must fit
        compile(synthesized, cm, CompilerConfig(memory_budget=2000))


def test_the_runtime_base_and_load_transients_are_part_of_the_planned_peak():
    cm = CostModel({"small": ModelCost(1000, 0, 1e-3, 1e-2, load_extra_bytes=500)}, {"general": "small",
                                                                                    "aggregator": "small"},
                   base_bytes=300)
    g = Graph()
    add_query(g, "q0", "a?", [Sq(1, "a?", (), "general")], "aggregator")
    plan = compile(g, cm)
    assert plan.peak_planned_bytes == 300 + 1000 + 500  # base + weights + the load's transient
    assert compile(g, cm, resident=["small"]).peak_planned_bytes == 1300  # already loaded: no transient, no load
    with pytest.raises(MemoryBudgetError, match="runtime base 300"):
        compile(g, cm, CompilerConfig(memory_budget=1700))


@pytest.mark.parametrize("break_it, message", [
    (lambda p: p.steps.reverse(), "not an earlier step"),
    (lambda p: p.steps.__setitem__(1, replace(p.steps[1], deps=())), "does not depend on|not resident"),
    (lambda p: setattr(p, "memory_budget", p.peak_planned_bytes - 1), "> budget"),
    (lambda p: p.steps.append(replace(p.steps[1], id="gen:again")), "more than one step"),
    (lambda p: p.steps.__setitem__(1, replace(p.steps[1], stream=5)), "stream"),
])
def test_plan_verify_refuses_broken_plans(break_it, message):
    plan = compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=3500, max_batch_size=2))
    plan.verify(golden_cost())
    break_it(plan)
    with pytest.raises(PlanError, match=message):
        plan.verify(golden_cost())
