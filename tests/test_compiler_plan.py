"""compile() end to end: plan properties on random DAGs, determinism, goldens, Belady vs LRU, errors."""
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compiler import CompilerConfig, CostModel, ModelCost, Plan, StepKind, compile
from compiler.build import RoutedSubQuery as Sq
from compiler.build import add_query
from compiler.errors import ConfigError, MemoryBudgetError
from compiler.ir import AnswerType, Graph
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
        eviction=draw(st.sampled_from(["belady", "lru"])),
        streams=draw(st.integers(1, 3)),
        fuse=draw(st.sampled_from([[], ["chains"]])),
    )
    # smallest feasible budget: a model's weights + its largest node's KV, measured on the graph after the
    # budget-independent rewrites (dedupe/fuse change prompts), so compile once without a budget
    compiled = compile(graph, cm, config).graph
    floor = max(cm.cost(cm.model_of(n)).weight_bytes + cm.node_kv_bytes(n, compiled) for n in compiled)
    total = sum(mc.weight_bytes for mc in cm.models.values())
    if uniform:  # equal footprints (no KV): the budget holds k models, the classic caching setting
        config.memory_budget = floor * draw(st.integers(1, max(1, n_models - 1)))
    else:
        config.memory_budget = floor if tight else draw(
            st.one_of(st.none(), st.just(floor), st.integers(floor, floor + total // 2)))
    return graph, cm, config


def random_topological_order(plan: Plan, rng: random.Random) -> list:
    """Any order an eager dataflow executor could pick: a random linear extension of the step DAG."""
    waiting = {s.id: len(s.deps) for s in plan.steps}
    dependents = {s.id: [] for s in plan.steps}
    for s in plan.steps:
        for d in s.deps:
            dependents[d].append(s.id)
    by_id = {s.id: s for s in plan.steps}
    ready = [s.id for s in plan.steps if not s.deps]
    order = []
    while ready:
        sid = ready.pop(rng.randrange(len(ready)))
        order.append(by_id[sid])
        for child in dependents[sid]:
            waiting[child] -= 1
            if not waiting[child]:
                ready.append(child)
    assert len(order) == len(plan.steps), "step DAG has a cycle"
    return order


def simulate_residency(order, budget) -> int:
    """Replay loads/evicts; every generate must find its model resident. Returns the peak resident bytes."""
    resident, used, peak = {}, 0, 0
    for s in order:
        if s.kind is StepKind.LOAD:
            assert s.model not in resident, f"{s.id}: {s.model} loaded twice"
            resident[s.model] = s.bytes
            used += s.bytes
        elif s.kind is StepKind.EVICT:
            assert s.model in resident, f"{s.id}: {s.model} evicted while not resident"
            used -= resident.pop(s.model)
        else:
            assert s.model in resident, f"{s.id}: generate on {s.model}, which is not resident"
        peak = max(peak, used)
        if budget is not None:
            assert used <= budget, f"after {s.id}: {used} resident bytes > budget {budget}"
    return peak


def check_plan(plan: Plan, original: Graph, cm: CostModel, budget) -> None:
    steps = plan.steps
    index = {s.id: i for i, s in enumerate(steps)}
    assert len(index) == len(steps), "step ids are unique"
    for i, s in enumerate(steps):
        assert all(index[d] < i for d in s.deps), f"{s.id}: plan order is a topological order"

    # every node of the compiled graph runs exactly once, on its own model (part nodes: within their fused call)
    graph = plan.graph
    gens = [s for s in steps if s.kind is StepKind.GENERATE]
    counts = Counter(n for s in gens for n in s.nodes)
    called = {n.id for n in graph if n.part_of is None}
    assert set(counts) == called and set(counts.values()) == {1}
    for node in graph:
        if node.part_of is not None:
            assert node.id in graph.nodes[node.part_of].fused_from and node.part_of in called
    for s in gens:
        assert {cm.model_of(graph.nodes[n]) for n in s.nodes} == {s.model}
    # every original node is answered: kept (maybe as a part node), deduped onto one, or inside a fused call
    fused = {orig for n in graph for orig in n.fused_from}
    for nid in original.nodes:
        target = plan.aliases.get(nid, nid)
        assert target in graph.nodes or target in fused, nid
    assert not set(plan.aliases) & set(graph.nodes)
    assert all(q.sink in graph.nodes for q in graph.queries.values())

    # data dependencies: a node's step transitively depends on its parents' steps (ancestor bitsets)
    ancestors = {}
    for i, s in enumerate(steps):
        bits = 0
        for d in s.deps:
            bits |= ancestors[d] | (1 << index[d])
        ancestors[s.id] = bits
    step_of = plan.step_of_node()
    for node in graph:
        if node.part_of is not None:
            assert step_of[node.id] == step_of[node.part_of]  # answered by its fused node's call
            continue
        for parent in node.parents:
            assert ancestors[step_of[node.id]] >> index[step_of[parent]] & 1, (node.id, parent)

    # one model's generates share one stream; residency steps use the extra stream
    streams = {}
    for s in gens:
        assert streams.setdefault(s.model, s.stream) == s.stream and 0 <= s.stream < plan.streams
    assert all(s.stream == plan.streams for s in steps if s.kind is not StepKind.GENERATE)

    # memory: in plan order and in random orders an eager executor might pick
    peak = simulate_residency(steps, budget)
    assert peak == plan.peak_planned_bytes
    rng = random.Random(0)
    for _ in range(3):
        simulate_residency(random_topological_order(plan, rng), budget)
    if budget is not None:
        assert plan.peak_planned_bytes <= budget
    assert plan.critical_path_s() <= plan.estimated_span_s() + 1e-9


@PROPERTY
@given(st.one_of(workloads(), workloads(tight=True)))
def test_plans_on_random_dags_are_complete_ordered_and_within_budget(workload):
    graph, cm, config = workload
    before = graph.dump()
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
    belady = compile(graph, cm, CompilerConfig(**{**vars(config), "eviction": "belady"}))
    lru = compile(graph, cm, CompilerConfig(**{**vars(config), "eviction": "lru"}))
    assert belady.loads <= lru.loads
    event(f"belady saves loads: {belady.loads < lru.loads}")


def test_belady_strictly_fewer_loads_on_a_constructed_case():
    # one query whose chain alternates three equal models a b c a b c, aggregated on a: budget holds two models
    cm = CostModel({m: ModelCost(100, 0, 1e-3, 1e-2) for m in "abc"},
                   {"ea": "a", "eb": "b", "ec": "c", "aggregator": "a"})
    g = Graph()
    experts = ["ea", "eb", "ec"] * 2
    add_query(g, "q", "cyclic", [Sq(i + 1, f"step {i} #{i}" if i else "start", (i,) if i else (), e)
                                 for i, e in enumerate(experts)], "aggregator")
    loads = {ev: compile(g, cm, CompilerConfig(memory_budget=200, eviction=ev)).loads for ev in ("belady", "lru")}
    assert loads == {"belady": 5, "lru": 7}
    assert compile(g, cm, CompilerConfig(memory_budget=200, disabled=["level_schedule"])).loads == 7  # LRU fallback


# --- goldens ----------------------------------------------------------------------------------------

def golden_graph() -> Graph:
    g = Graph()
    add_query(g, "q0", "What is the capital of France and how many people live there?", [
        Sq(1, "What is the capital of France?", (), "general", max_new_tokens=8),
        Sq(2, "How many people live in #1?", (1,), "law", max_new_tokens=8)], "aggregator", 16)
    add_query(g, "q1", "What is the capital of France, and what is 2+2?", [
        Sq(1, "What is the capital of France?", (), "general", max_new_tokens=8),
        Sq(2, "What is 2+2?", (), "math", max_new_tokens=8)], "aggregator", 16)
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
  q2:agg [aggregate] expert=aggregator type=text inputs(#1=q2:1): 'Is the Seine longer than the Loire?'"""

GOLDEN_PLAN = """\
plan steps=8 loads=2 budget=3,500 peak=3,264 eviction=belady streams=1
  footprint small=1,056
  footprint big=3,264
  alias q1:1 -> q0:1
  [1] load:small#0: load small | resident=1,056
  [0] gen:small#0: generate small (q1:2, q2:1) after load:small#0 | resident=1,056
  [0] gen:small#1: generate small (q0:1) after load:small#0 | resident=1,056
  [1] evict:small#0: evict small after load:small#0, gen:small#0, gen:small#1 | resident=0
  [1] load:big#0: load big after evict:small#0 | resident=3,264
  [0] gen:big#0: generate big (q0:2, q2:agg) after load:big#0, gen:small#1, gen:small#0 | resident=3,264
  [0] gen:big#1: generate big (q1:agg) after load:big#0, gen:small#1, gen:small#0 | resident=3,264
  [0] gen:big#2: generate big (q0:agg) after load:big#0, gen:small#1, gen:big#0 | resident=3,264"""


def test_golden_graph_and_plan_text():
    plan = compile(golden_graph(), golden_cost(),
                   CompilerConfig(memory_budget=3500, max_batch_size=2, max_call_size=None))
    assert plan.graph.dump() == GOLDEN_GRAPH
    assert plan.dump() == GOLDEN_PLAN
    # small: 1000 B weights + its largest batch (the two shortest prompts together: 2 x (6 + 8) tokens x 2 B) = 1056
    assert plan.footprints == {"small": 1056, "big": 3264}
    # load small 0.1 s; two small batches; load big 1.5 s; then the big batches (q0:agg after gen:big#0)
    assert plan.critical_path_s() == pytest.approx(2.488)
    assert plan.estimated_span_s() == pytest.approx(2.952)
    assert plan.memory_profile()[3] == ("evict:small#0", 0)


def test_report_has_timings_and_optional_dumps():
    plan = compile(golden_graph(), golden_cost(), CompilerConfig(dump=True))
    report = plan.report
    assert list(report.pass_seconds) == ["dedupe", "fuse", "batch", "level_schedule"]
    assert report.total_seconds >= report.lower_seconds >= 0
    assert [name for name, _ in report.dumps] == ["input", "dedupe", "fuse", "batch", "level_schedule"]
    assert compile(golden_graph(), golden_cost()).report.dumps == []
    assert plan.loads == 2 and plan.count(StepKind.EVICT) == 0  # unlimited budget: load once, never evict


def test_disabling_passes_still_gives_a_valid_plan():
    g = golden_graph()
    for disabled in (["dedupe"], ["batch"], ["level_schedule"], ["dedupe", "fuse", "batch", "level_schedule"]):
        plan = compile(g, golden_cost(), CompilerConfig(memory_budget=3500, disabled=disabled))
        check_plan(plan, g, golden_cost(), 3500)
    no_batch = compile(g, golden_cost(), CompilerConfig(disabled=["batch"]))
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


def test_budget_too_small_for_the_largest_batch_without_batching_pass():
    # without `batch`, level_schedule builds one-node batches; the error names the node's KV
    expected = r"model 'big' needs 3,192 bytes \(weights 3,000 \+ KV 192 for node 'q0:agg' alone\)"
    with pytest.raises(MemoryBudgetError, match=expected):
        compile(golden_graph(), golden_cost(), CompilerConfig(memory_budget=3050, disabled=["batch"]))


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
    for bad in ({"eviction": "fifo"}, {"max_batch_size": 0}, {"max_call_size": 0}, {"memory_budget": 0},
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
