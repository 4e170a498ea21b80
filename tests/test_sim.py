"""The `sim` backend: exact makespans on hand-built plans, contract checks, and properties on random plans."""
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import CompilerConfig, CostModel, ModelCost, Plan, Step, StepKind, compile
from compiler.build import FinalAnswer
from compiler.build import RoutedSubQuery as Sq
from compiler.build import add_query
from compiler.ir import Graph
from compiler.synthetic import random_cost_model, random_graph
from compiler.simulate import DEFAULT_BANDWIDTH_BPS, PlanViolation, simulate, to_chrome_trace

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
L, E, G = StepKind.LOAD, StepKind.EVICT, StepKind.GENERATE


def two_models() -> CostModel:
    return CostModel({"a": ModelCost(10, 0, 0.0, 0.0, load_s=2.0), "b": ModelCost(20, 0, 0.0, 0.0, load_s=3.0)},
                     {"x": "a", "y": "b", "aggregator": "a"})


def tiny_plan(budget=30) -> Plan:
    """io stream 1: load a [0,2], load b [2,5], evict a; stream 0: gen a [2,6], gen b waits for the stream [6,7]."""
    steps = [
        Step("load:a#0", L, "a", stream=1, bytes=10),
        Step("load:b#0", L, "b", stream=1, bytes=20),
        Step("gen:a#0", G, "a", ("n1",), ("load:a#0",), 0, est_s=4.0),
        Step("gen:b#0", G, "b", ("n2",), ("load:b#0",), 0, est_s=1.0),
        Step("evict:a#0", E, "a", (), ("load:a#0", "gen:a#0"), 1, bytes=10),
    ]
    return Plan(steps, budget, {"a": 10, "b": 20}, streams=1)


def test_hand_built_plan_has_the_known_makespan_and_bounds():
    sim = simulate(tiny_plan(), two_models())
    assert sim.makespan_s == 7.0  # gen b's load is done at 5, but stream 0 is busy with gen a until 6
    assert sim.critical_path_s == 6.0  # load a + gen a; gen b does not depend on gen a
    assert sim.lower_bound_s == 6.0 and sim.gap == pytest.approx(7 / 6 - 1)
    assert {sp.step: (sp.start, sp.end) for sp in sim.spans} == {
        "load:a#0": (0.0, 2.0), "load:b#0": (2.0, 5.0), "gen:a#0": (2.0, 6.0), "gen:b#0": (6.0, 7.0),
        "evict:a#0": (6.0, 6.0)}
    assert (sim.loads, sim.evictions, sim.generates) == (2, 1, 2)
    assert sim.stream_busy_s == {0: 5.0, 1: 5.0} and sim.stream_utilisation[0] == pytest.approx(5 / 7)
    assert sim.compute_busy_s == 5.0 and sim.work_bound_s == 5.0
    assert sim.peak_resident_bytes == 30 and sim.memory_timeline[-1] == (6.0, 20)
    assert sim.bandwidth_Bps == DEFAULT_BANDWIDTH_BPS


def test_shared_device_splits_overlapping_generates():
    """Two 2 s batches on two streams of one GPU both finish at 4 s; as two devices, at 2 s."""
    steps = [Step("load:a#0", L, "a", stream=2, bytes=10), Step("load:b#0", L, "b", stream=2, bytes=20),
             Step("gen:a#0", G, "a", ("n1",), ("load:a#0", "load:b#0"), 0, est_s=2.0),
             Step("gen:b#0", G, "b", ("n2",), ("load:a#0", "load:b#0"), 1, est_s=2.0)]
    plan = Plan(steps, None, {"a": 10, "b": 20}, streams=2)
    shared, apart = simulate(plan, two_models()), simulate(plan, two_models(), shared_device=False)
    assert shared.makespan_s == pytest.approx(9.0) and apart.makespan_s == pytest.approx(7.0)
    assert shared.compute_busy_s == pytest.approx(4.0) and shared.work_bound_s == pytest.approx(4.0)
    assert apart.work_bound_s == pytest.approx(2.0)  # two devices


def test_contract_violations_are_reported():
    cm = two_models()
    with pytest.raises(PlanViolation, match="reserved > budget"):
        simulate(tiny_plan(budget=29), cm)
    no_load = [Step("gen:a#0", G, "a", ("n1",), (), 0, est_s=1.0)]
    with pytest.raises(PlanViolation, match="not resident"):
        simulate(Plan(no_load, None, {}, 1), cm)
    early_evict = [Step("load:a#0", L, "a", stream=1, bytes=10), Step("gen:a#0", G, "a", ("n1",), ("load:a#0",), 0,
                   est_s=1.0), Step("evict:a#0", E, "a", (), ("load:a#0",), 1, bytes=10)]
    with pytest.raises(PlanViolation, match="under a running batch"):
        simulate(Plan(early_evict, None, {"a": 10}, 1), cm)
    with pytest.raises(PlanViolation, match="not an earlier step"):
        simulate(Plan([Step("gen:a#0", G, "a", ("n1",), ("load:a#0",), 0)], None, {}, 1), cm)
    racing = [Step("load:a#0", L, "a", stream=1, bytes=10), Step("gen:a#0", G, "a", ("n1",), (), 0, est_s=1.0)]
    with pytest.raises(PlanViolation, match="still loading"):  # the generate forgot its dep on the load
        simulate(Plan(racing, None, {"a": 10}, 1), cm)


def test_bytes_read_counts_weights_per_decode_step_and_kv_once():
    cm = CostModel({"m": ModelCost(1000, 10, 1e-3, 1e-2)}, {"x": "m", "aggregator": "m"})
    g = Graph()
    add_query(g, "q", "Q?", [Sq(1, "abcdefgh", (), "x", max_new_tokens=5)], "aggregator", 7,
              final=FinalAnswer.model)
    plan = compile(g, cm)
    sim = simulate(plan, cm, bandwidth_Bps=1e6)
    # node q:1: prompt 8 chars // 4 + 1 = 3 tokens, 5 out; aggregate: its own prompt + 5 pasted tokens, 7 out
    agg_prompt = cm.node_tokens(plan.graph.nodes["q:agg"], plan.graph)[0]
    expected = 1000 * 5 + 8 * 10 + 1000 * 7 + (agg_prompt + 7) * 10
    assert sim.bytes_read == expected and sim.bytes_read_bound_s == pytest.approx(expected / 1e6)
    assert sim.kv_reread_bytes == 10 * (5 * 3 + 10) + 10 * (7 * agg_prompt + 21)
    assert sim.lower_bound_s == max(sim.critical_path_s, sim.bytes_read_bound_s)


# --- random plans -------------------------------------------------------------------------------------

@st.composite
def compiled(draw):
    """A compiled random workload with a budget between the smallest feasible one and ~everything resident."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    experts = [f"e{i}" for i in range(draw(st.integers(2, 8)))]
    cm = random_cost_model(rng, experts, draw(st.integers(1, 5)))
    graph = random_graph(rng, experts, n_queries=draw(st.integers(1, 30)), min_sub=1, max_sub=6)
    config = CompilerConfig(max_batch_size=draw(st.integers(1, 10)), max_call_size=draw(st.sampled_from([None, 4, 64])),
                            residency=draw(st.sampled_from(["belady", "lru"])),
                            streams=draw(st.integers(1, 3)), fuse=draw(st.sampled_from([[], ["chains"]])),
                            disabled=draw(st.sampled_from([[], ["dedupe"], ["dedupe", "fuse"]])))
    free = compile(graph, cm, config)
    floor = max(free.footprints.values())
    config.memory_budget = draw(st.integers(floor, floor + sum(free.footprints.values()) // 2))
    return compile(graph, cm, config), cm


@PROPERTY
@given(compiled(), st.booleans())
def test_random_plans_stay_in_budget_and_above_the_lower_bound(case, shared):
    plan, cm = case
    sim = simulate(plan, cm, shared_device=shared)  # raises PlanViolation if the budget is ever exceeded
    assert sim.peak_resident_bytes <= plan.memory_budget
    assert sim.peak_used_bytes <= sim.peak_resident_bytes  # footprints reserve each model's largest batch
    assert sim.steps_faster_than_bandwidth == 0  # random costs are slower than an H100 reads their weights
    eps = 1e-9 * max(1.0, sim.makespan_s)
    assert sim.makespan_s >= sim.lower_bound_s - eps and sim.makespan_s >= sim.work_bound_s - eps
    assert sim.lower_bound_s == max(sim.critical_path_s, sim.bytes_read_bound_s)
    assert len(sim.spans) == len(plan.steps) and sim.loads == plan.loads
    # durations from the cost model = what lowering estimated; as separate devices = the plan's own estimate
    by_step = {s.id: s for s in plan.steps}
    assert all(sp.end - sp.start >= by_step[sp.step].est_s - eps for sp in sim.spans if sp.kind == "generate")
    if not shared or plan.streams == 1:
        assert sim.makespan_s == pytest.approx(plan.estimated_span_s(), rel=1e-9, abs=1e-12)
    assert sim.critical_path_s == pytest.approx(plan.critical_path_s(), rel=1e-9, abs=1e-12)
    # every step starts after its deps, and a stream runs one step at a time in plan order
    span = {sp.step: sp for sp in sim.spans}
    for s in plan.steps:
        assert all(span[d].end <= span[s.id].start for d in s.deps)
    for stream in {s.stream for s in plan.steps}:
        mine = [span[s.id] for s in plan.steps if s.stream == stream]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))


@settings(max_examples=10, deadline=None)
@given(compiled())
def test_simulation_and_trace_are_deterministic_and_well_formed(case):
    plan, cm = case
    first, again = simulate(plan, cm), simulate(Plan.from_json(plan.to_json()), cm)
    assert first == again
    trace = to_chrome_trace(first)
    assert json.dumps(trace) == json.dumps(to_chrome_trace(again))
    json.loads(json.dumps(trace))  # JSON-serializable
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in xs) == sorted(s.id for s in plan.steps)
    by_step = {s.id: s for s in plan.steps}
    for e in xs:
        s = by_step[e["name"]]
        assert e["pid"] == 1 and e["tid"] == s.stream and e["ts"] >= 0 and e["dur"] >= 0
        assert e["args"]["model"] == s.model and e["args"]["nodes"] == list(s.nodes) and e["cat"] == s.kind.value
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names[plan.streams] == "load/evict" and all(names[k] == f"compute {k}" for k in range(plan.streams)
                                                        if k in names)
    assert all(e["ph"] in ("X", "M", "C") for e in trace["traceEvents"])
