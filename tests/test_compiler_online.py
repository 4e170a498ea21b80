"""Online compilation: random DAGs fed in random arrival orders and chunkings compile into increments of one
append-only plan that is verified after every increment, never changes an issued step, answers every node once,
respects every dependency and the budget, and gives the same answers as the one-shot compile."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import CompilerConfig, compile
from compiler.ir import Graph
from compiler.online import OnlineCompiler
from compiler.plan import StepKind
from compiler.simulate import simulate
from compiler.synthetic import random_cost_model, random_graph

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def arrivals(graph: Graph, rng: random.Random) -> list[list]:
    """The graph's nodes in chunks as a server would see them: queries interleaved at random, each query's
    sub-queries in order (a part only after the parts it reads), its final-answer node and query record last."""
    per_query = {qid: [n for n in graph if n.provenance.query_id == qid] for qid in graph.queries}
    streams = {qid: nodes[:-1] for qid, nodes in per_query.items()}
    chunks, current = [], []
    while streams:
        qid = rng.choice(sorted(streams))
        if streams[qid]:
            current.append(streams[qid].pop(0))
        else:
            current.append((graph.nodes[graph.queries[qid].sink], graph.queries[qid]))
            del streams[qid]
        if rng.random() < 0.3:
            chunks.append(current)
            current = []
    return chunks + ([current] if current else [])


@st.composite
def workloads(draw):
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    experts = [f"e{i}" for i in range(draw(st.integers(1, 5)))]
    cm = random_cost_model(rng, experts, draw(st.integers(1, 3)))
    graph = random_graph(rng, experts, n_queries=draw(st.integers(1, 15)), min_sub=1, max_sub=5,
                         shared_prob=draw(st.floats(0, 0.5)), shared_pool=3)
    config = CompilerConfig(max_batch_size=draw(st.integers(1, 8)), max_call_size=draw(st.sampled_from([None, 4])),
                            streams=draw(st.integers(1, 2)), fuse=draw(st.sampled_from([[], ["chains"]])),
                            residency=draw(st.sampled_from(["belady", "lru"])))
    free = compile(graph, cm, config)
    # online, queries fuse and dedupe against whatever has arrived, so a node's prompt can differ from the one-shot
    # plan's: leave twice the largest single call's bytes above the weights
    alone = [cm.cost(cm.model_of(n)).weight_bytes + 2 * cm.batch_bytes(cm.model_of(n), [cm.node_tokens(n, g)])
             for g in (graph, free.graph) for n in g if n.needs_model]
    floor = max([*free.footprints.values(), *alone])
    config.memory_budget = draw(st.one_of(st.none(), st.integers(floor, floor + sum(free.footprints.values()))))
    return graph, cm, config, rng


@PROPERTY
@given(workloads())
def test_random_arrivals_compile_into_a_valid_append_only_plan(workload):
    graph, cm, config, rng = workload
    online = OnlineCompiler(cm, config)
    issued = []
    for chunk in arrivals(graph, rng):
        nodes = [x[0] if isinstance(x, tuple) else x for x in chunk]
        queries = [x[1] for x in chunk if isinstance(x, tuple)]
        online.add(nodes, queries)
        before = list(online.plan.steps)
        new = online.compile()  # verifies the cumulative plan (Plan.verify) after the increment
        assert online.plan.steps[: len(before)] == before, "issued steps never change"
        assert online.plan.steps[len(before):] == new
        issued += new
    plan = online.plan
    plan.verify(cm, orders=5)
    sim = simulate(plan, cm)  # the shared executor contract on a virtual clock: raises on any violation
    if config.memory_budget is not None:
        assert sim.peak_resident_bytes <= config.memory_budget
    # every original node answered once: kept, deduped onto a node of any increment, or fused
    answered = plan.step_of_node()
    for nid in graph.nodes:
        target = plan.aliases.get(nid, nid)
        assert target in answered or any(target in n.fused_from for n in plan.graph), nid
    one_shot = compile(graph, cm, config)
    assert plan.count(StepKind.HOST) == one_shot.count(StepKind.HOST)


def test_one_increment_is_the_one_shot_plan():
    rng = random.Random(3)
    experts = ["a", "b"]
    cm = random_cost_model(rng, experts, 2)
    graph = random_graph(rng, experts, n_queries=6)
    online = OnlineCompiler(cm, CompilerConfig())
    online.add_graph(graph)
    online.compile()
    assert online.plan.to_json() == compile(graph, cm, CompilerConfig()).to_json()


def test_a_later_identical_subquery_reuses_the_answer_an_earlier_increment_computes():
    from compiler.build import RoutedSubQuery as Sq
    from compiler.build import add_query
    from compiler.cost import CostModel, ModelCost

    cm = CostModel({"m": ModelCost(100, 1, 1e-3, 1e-2)}, {"g": "m", "aggregator": "m"})
    first, second = Graph(), Graph()
    add_query(first, "q0", "capital?", [Sq(1, "What is the capital of France?", (), "g")], "aggregator")
    add_query(second, "q1", "capital again?", [Sq(1, "What is the capital of France?", (), "g")], "aggregator")
    online = OnlineCompiler(cm)
    online.add_graph(first)
    online.compile()
    online.add_graph(second)
    new = online.compile()
    assert online.plan.aliases == {"q1:1": "q0:1"}
    assert [s.kind for s in new] == [StepKind.HOST]  # no model call: q1's answer is q0's
