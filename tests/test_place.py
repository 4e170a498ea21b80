"""The cluster spec and the `place` pass: per-device budgets, replicas by demand, plans that verify and round-trip,
`explain`'s placement, the simulator's bounds on a cluster, discovery from Ray's node list, and config."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import CompilerConfig, CostModel, ModelCost, Plan, StepKind, compile
from compiler.build import FinalAnswer
from compiler.build import RoutedSubQuery as Sq
from compiler.build import add_query
from compiler.cluster import ClusterSpec, NodeSpec, PlacementPolicy, uniform_cluster
from compiler.errors import ConfigError, MemoryBudgetError
from compiler.explain import explain_text
from compiler.ir import Graph
from compiler.pass_manager import PipelineError, check_pipeline
from compiler.plan_verify import PlanError
from compiler.simulate import simulate
from compiler.synthetic import random_cost_model, random_graph
from compllm.cluster import node_spec, resolve_cluster

GB = 10**9
POLICIES = [p.value for p in PlacementPolicy]


def two_big_models() -> CostModel:
    """Two 6 GB models: together they need 12 GB, more than one 10 GB device holds."""
    return CostModel({"a": ModelCost(6 * GB, 1000, 1e-4, 1e-2, load_s=1.0),
                      "b": ModelCost(6 * GB, 1000, 1e-4, 1e-2, load_s=1.0)},
                     {"x": "a", "y": "b", "aggregator": "a"})


def two_expert_graph(queries: int = 4) -> Graph:
    g = Graph()
    for q in range(queries):
        add_query(g, f"q{q}", f"Question {q}?", [Sq(1, f"x part of {q}?", (), "x", max_new_tokens=16),
                                                Sq(2, f"y part of {q} given #1?", (1,), "y", max_new_tokens=16)],
                  "aggregator", 16, final=FinalAnswer.model)
    return g


def loads_by_device(plan: Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in plan.steps:
        if s.kind is StepKind.LOAD:
            out.setdefault(s.where, []).append(s.model)
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_that_fits_one_model_per_node_puts_the_two_models_on_different_nodes(policy):
    cluster = ClusterSpec("two", [NodeSpec("head", 1, 10 * GB), NodeSpec("worker", 1, 10 * GB)])
    cost = two_big_models()
    plan = compile(two_expert_graph(), cost, CompilerConfig(placement=policy), cluster=cluster)  # verifies
    where = {s.model: s.node for s in plan.steps if s.kind is StepKind.LOAD}
    assert set(where) == {"a", "b"} and where["a"] != where["b"]
    assert plan.count(StepKind.EVICT) == 0  # each node holds its model throughout
    for s in plan.steps:  # every model step names a node of the cluster; host steps stay in this process
        assert (s.node in ("head", "worker")) == (s.kind is not StepKind.HOST)
    assert plan.devices == {"head/0": 10 * GB, "worker/0": 10 * GB}
    sim = simulate(plan, cost)  # runs under the per-device budgets without a violation
    assert sim.peak_resident_bytes <= 10 * GB


def test_one_device_too_small_for_both_swaps_them_and_stays_within_its_budget():
    """Both models on one 10 GB device: Belady runs on that device, loading and evicting within its budget."""
    cluster = ClusterSpec("one", [NodeSpec("solo", 1, 10 * GB)])
    plan = compile(two_expert_graph(), two_big_models(), CompilerConfig(), cluster=cluster)
    assert plan.count(StepKind.EVICT) >= 1 and {s.where for s in plan.steps if s.node} == {"solo/0"}
    assert simulate(plan, two_big_models()).peak_resident_bytes <= 10 * GB


def test_a_model_larger_than_every_device_is_refused_naming_it():
    cluster = uniform_cluster(2, 2, 5 * GB)
    with pytest.raises(MemoryBudgetError, match="model 'a'.*largest device"):
        compile(two_expert_graph(), two_big_models(), CompilerConfig(), cluster=cluster)


def skewed() -> tuple[Graph, CostModel]:
    """`hot` answers 40 sub-queries, `cold` 2; both small, on 4 roomy devices."""
    g = Graph()
    for q in range(40):
        subs = [Sq(1, f"hot question {q}?", (), "hot", max_new_tokens=64)]
        if q < 2:
            subs.append(Sq(2, f"cold question {q}?", (), "cold", max_new_tokens=64))
        add_query(g, f"q{q}", f"Q{q}?", subs, "aggregator", 16)
    cost = CostModel({"hot": ModelCost(GB, 1000, 1e-4, 2e-2, load_s=0.5),
                      "cold": ModelCost(GB, 1000, 1e-4, 2e-2, load_s=0.5)},
                     {"hot": "hot", "cold": "cold", "aggregator": "cold"})
    return g, cost


def test_demand_gives_the_busy_model_replicas_and_spreads_its_calls_over_them():
    g, cost = skewed()
    config = CompilerConfig(max_batch_size=4, max_call_size=4)
    cluster = uniform_cluster(2, 2, 10 * GB)
    plan = compile(g, cost, config, cluster=cluster)
    loads = loads_by_device(plan)
    hot_devices = [d for d, ms in loads.items() if "hot" in ms]
    assert len(hot_devices) >= 3  # 10 calls of `hot`, 1 of `cold`: hot gets most devices
    assert sum("cold" in ms for ms in loads.values()) == 1  # cold's demand warrants no second replica
    calls = {s.where for s in plan.steps if s.kind is StepKind.GENERATE and s.model == "hot"}
    assert calls == set(hot_devices)  # every replica runs some of hot's calls
    one = compile(g, cost, CompilerConfig(max_batch_size=4, max_call_size=4, placement="one_per_expert"),
                  cluster=cluster)
    assert sum("hot" in ms for ms in loads_by_device(one).values()) == 1
    fast, slow = simulate(plan, cost), simulate(one, cost)
    assert fast.makespan_s < 0.5 * slow.makespan_s  # replicas run hot's calls side by side
    assert plan.graph.annotations["placement"].est_finish_s == pytest.approx(fast.makespan_s)


def test_round_robin_puts_models_on_devices_in_first_use_order():
    g, cost = skewed()
    plan = compile(g, cost, CompilerConfig(placement="round_robin"), cluster=uniform_cluster(2, 2, 10 * GB))
    assert loads_by_device(plan) == {"n0/0": ["hot"], "n0/1": ["cold"]}


def test_plan_round_trips_through_json_with_its_placement():
    plan = compile(two_expert_graph(), two_big_models(), CompilerConfig(),
                   cluster=ClusterSpec("two", [NodeSpec("head", 1, 10 * GB), NodeSpec("worker", 1, 10 * GB)]))
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again.to_json() == text and again.devices == plan.devices
    assert [(s.node, s.device) for s in again.steps] == [(s.node, s.device) for s in plan.steps]
    again.verify(two_big_models())
    assert '"node": "head"' in text and '"device": 0' in text


def test_local_cluster_changes_nothing():
    g, cost = skewed()
    base = compile(g, cost, CompilerConfig())
    for cluster in (None, ClusterSpec()):
        plan = compile(g, cost, CompilerConfig(), cluster=cluster)
        assert plan.to_json() == base.to_json()
    assert '"node"' not in base.to_json() and "devices" not in base.to_dict() and "placement" not in base.graph.annotations


def test_verify_checks_each_device_against_its_own_budget_and_known_devices():
    cluster = ClusterSpec("two", [NodeSpec("head", 1, 10 * GB), NodeSpec("worker", 1, 10 * GB)])
    plan = compile(two_expert_graph(), two_big_models(), CompilerConfig(), cluster=cluster)
    small = Plan.from_dict({**plan.to_dict(), "devices": {"head/0": 5 * GB, "worker/0": 10 * GB}})
    with pytest.raises(PlanError, match="bytes held on head/0 > budget 5,000,000,000"):
        small.verify()
    data = plan.to_dict()
    moved = dict(next(s for s in data["steps"] if s["kind"] == "generate"), node="elsewhere")
    data["steps"] = [moved if s["id"] == moved["id"] else s for s in data["steps"]]
    with pytest.raises(PlanError, match="device 'elsewhere/0', which is not one of the plan's devices"):
        Plan.from_dict(data).verify()
    # both models on one device: the per-device replay sees 12 GB on a 10 GB device
    data = plan.to_dict()
    data["steps"] = [dict(s, node="head") if s.get("node") else s for s in data["steps"]]
    with pytest.raises(PlanError, match="on head/0 > budget"):
        Plan.from_dict(data).verify()


def test_explain_shows_the_placement():
    g, cost = skewed()
    plan = compile(g, cost, CompilerConfig(max_batch_size=4, max_call_size=4), cluster=uniform_cluster(2, 2, 10 * GB))
    text = explain_text(g, plan)
    assert "== placement" in text and "placement: 4 device(s)" in text
    assert "n0/0 (10.0 GB): " in text and "hot: " in text
    assert "[n0/0 " in plan.dump() or "[n0/1 " in plan.dump()  # steps name their device
    assert "== placement" not in explain_text(g, compile(g, cost, CompilerConfig()))


def test_place_must_run_before_residency():
    with pytest.raises(PipelineError, match="'place' runs after 'residency' and invalidates"):
        check_pipeline(["batch", "schedule", "residency", "place"])
    assert [p.name for p in check_pipeline(["batch", "schedule", "residency"])] == ["batch", "schedule", "residency"]


def test_unknown_placement_policy_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="placement: demand, round_robin, one_per_expert"):
        CompilerConfig(placement="nearest").validate()


def test_an_undiscovered_ray_spec_is_refused_at_compile():
    with pytest.raises(ConfigError, match="discover: true.*resolve_cluster"):
        compile(two_expert_graph(), two_big_models(), CompilerConfig(), cluster=ClusterSpec("ray", discover=True))


# --- the simulator on a cluster: the bound is a real lower bound ---------------------------------------------

CLUSTER_PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CLUSTER_PROPERTY
@given(seed=st.integers(0, 10**6), nodes=st.integers(1, 3), devices=st.integers(1, 3),
       policy=st.sampled_from(POLICIES), n_models=st.integers(1, 5))
def test_simulated_bounds_never_exceed_the_makespan(seed, nodes, devices, policy, n_models):
    rng = random.Random(seed)
    experts = [f"e{i}" for i in range(6)]
    cost = random_cost_model(rng, experts, n_models, weight_bytes=(10**8, 2 * 10**9))
    graph = random_graph(rng, experts, n_queries=rng.randint(1, 12))
    memory = rng.choice([None, 5 * GB, 3 * GB])
    plan = compile(graph, cost, CompilerConfig(placement=policy, max_batch_size=rng.choice([1, 4])),
                   cluster=uniform_cluster(nodes, devices, memory))
    sim = simulate(plan, cost)
    assert sim.critical_path_s <= sim.makespan_s * (1 + 1e-9)
    assert sim.work_bound_s <= sim.makespan_s * (1 + 1e-9)  # one generate at a time per device
    assert sim.work_bound_s <= sim.memory_bound_s * (1 + 1e-9)  # loads idle devices
    assert sim.memory_bound_s <= sim.makespan_s * (1 + 1e-9)
    assert sim.lower_bound_s <= sim.makespan_s * (1 + 1e-9)
    assert sim.devices == nodes * devices
    for where, busy in sim.device_busy_s.items():
        assert busy <= sim.makespan_s * (1 + 1e-9)
    if memory is not None:
        assert sim.peak_resident_bytes <= memory


@CLUSTER_PROPERTY
@given(seed=st.integers(0, 10**6), nodes=st.integers(1, 3), devices=st.integers(1, 3),
       policy=st.sampled_from(POLICIES), big=st.integers(1, 3), load_s=st.floats(0.0, 5.0))
def test_memory_bound_never_exceeds_the_makespan_with_models_that_fill_a_device(seed, nodes, devices, policy, big,
                                                                                load_s):
    """Models of 7 GB on 10 GB devices share a device with nothing (exclusive), beside 1 GB models: the bound
    charges their loads as idle device time; it must stay at or below every simulated makespan."""
    rng = random.Random(seed)
    models = {f"big{i}": ModelCost(7 * GB, 1000, rng.uniform(1e-4, 1e-3), rng.uniform(1e-3, 3e-2),
                                   load_s=load_s * rng.uniform(0.5, 1.5)) for i in range(big)}
    models |= {f"small{i}": ModelCost(GB, 1000, 1e-4, rng.uniform(1e-3, 1e-2), load_s=rng.uniform(0.0, 1.0))
               for i in range(2)}
    names = list(models)
    experts = [f"e{i}" for i in range(5)]
    cost = CostModel(models, {**{e: rng.choice(names) for e in experts}, "aggregator": rng.choice(names)})
    graph = random_graph(rng, experts, n_queries=rng.randint(1, 16))
    plan = compile(graph, cost, CompilerConfig(placement=policy, max_batch_size=rng.choice([1, 4])),
                   cluster=uniform_cluster(nodes, devices, 10 * GB))
    sim = simulate(plan, cost)
    assert sim.work_bound_s <= sim.memory_bound_s * (1 + 1e-9)
    assert sim.memory_bound_s <= sim.makespan_s * (1 + 1e-9)


def test_memory_bound_charges_the_loads_of_a_model_that_fills_its_device():
    """One 7 GB model (load 4 s) on one 10 GB device, beside a 4 GB model: nothing computes while the big one
    loads, so the bound is at least its load + all generate seconds, above the work bound."""
    cost = CostModel({"a": ModelCost(7 * GB, 1000, 1e-4, 1e-2, load_s=4.0),
                      "b": ModelCost(4 * GB, 1000, 1e-4, 1e-2, load_s=0.5)},
                     {"x": "a", "y": "b", "aggregator": "b"})
    plan = compile(two_expert_graph(6), cost, CompilerConfig(), cluster=uniform_cluster(1, 1, 10 * GB))
    sim = simulate(plan, cost)
    assert sim.memory_bound_s >= sim.work_bound_s + 4.0 - 1e-6
    assert sim.memory_bound_s <= sim.makespan_s * (1 + 1e-9)
    assert sim.lower_bound_s >= sim.memory_bound_s


def test_roofline_bytes_bound_holds_on_a_cluster():
    """With roofline costs (every call at least its bytes / bandwidth) the bytes term is a bound too."""
    bw = 3.35e12
    models = {f"m{i}": ModelCost.roofline(int(p), 1, 32, 8, 128, bw, 6e14, call_overhead_s=0.005)
              for i, p in enumerate([7e9, 8e9, 14e9])}
    cost = CostModel(models, {"e0": "m0", "e1": "m1", "e2": "m2", "aggregator": "m0"}, batch_alpha=0.02)
    graph = random_graph(random.Random(3), ["e0", "e1", "e2"], n_queries=60)
    for policy in POLICIES:
        plan = compile(graph, cost, CompilerConfig(placement=policy, max_batch_size=8, max_call_size=8),
                       cluster=uniform_cluster(2, 2, 80 * GB))
        sim = simulate(plan, cost, bandwidth_Bps=bw)
        assert sim.steps_faster_than_bandwidth == 0
        assert max(sim.critical_path_s, sim.bytes_read_bound_s, sim.work_bound_s) <= sim.makespan_s * (1 + 1e-9)


# --- discovery ---------------------------------------------------------------------------------------------

RAY_NODES = [  # the shape of `ray.nodes()` (ray 2.60): one GPU node, one CPU-only node named by its resource
    {"NodeID": "a1b2c3d4e5f6a7b8", "Alive": True,
     "Resources": {"CPU": 16.0, "GPU": 8.0, "memory": 1.2e11, "object_store_memory": 4e10, "node:10.0.0.1": 1.0,
                   "accelerator_type:H100": 1.0, "n0": 1.0}},
    {"NodeID": "ffff0000ffff0000", "Alive": True,
     "Resources": {"CPU": 2.0, "memory": 8e9, "object_store_memory": 1e9, "node:10.0.0.2": 1.0, "worker": 1.0}},
    {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 2.0, "gone": 1.0}},
]


def test_discovered_nodes_are_named_by_their_custom_resource():
    spec = resolve_cluster(ClusterSpec("ray", discover=True, device_memory=80 * GB), RAY_NODES)
    assert not spec.discover and [(n.name, n.devices, n.memory_per_device) for n in spec.nodes] == [
        ("n0", 8, 80 * GB), ("worker", 1, 80 * GB)]
    cpu = node_spec(RAY_NODES[1])
    assert (cpu.name, cpu.devices, cpu.memory_per_device) == ("worker", 1, 8 * 10**9)
    assert resolve_cluster(ClusterSpec()) is None  # local: nothing to place
    with pytest.raises(ConfigError, match="no alive nodes"):
        resolve_cluster(ClusterSpec("ray", discover=True), [RAY_NODES[2]])


def test_cluster_spec_errors_name_the_node():
    with pytest.raises(ConfigError, match="node name 'n0' is used twice"):
        ClusterSpec("x", [NodeSpec("n0"), NodeSpec("n0")]).validate()
    with pytest.raises(ConfigError, match="node 'n1' needs devices >= 1"):
        ClusterSpec("x", [NodeSpec("n1", 0)]).validate()
    with pytest.raises(ConfigError, match="needs a name without '/'"):
        ClusterSpec("x", [NodeSpec("a/b")]).validate()


def test_cluster_config_group_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from pathlib import Path

    from compllm.config.schema import register

    register()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        local = OmegaConf.to_object(compose("config").cluster)
        assert isinstance(local, ClusterSpec) and local.is_local and not local.discover
        ray = OmegaConf.to_object(compose("config", overrides=["cluster=ray"]).cluster)
        assert ray.discover and ray.name == "ray"
        h100 = OmegaConf.to_object(compose("config", overrides=["cluster=h100_8x8"]).cluster)
        assert len(h100.devices()) == 64 and h100.nodes[0].memory_per_device == 80 * GB
        cfg = compose("config", overrides=["compiler.placement=round_robin"])
        assert OmegaConf.to_object(cfg.compiler).placement is PlacementPolicy.round_robin
        with pytest.raises(Exception, match="placement"):
            compose("config", overrides=["compiler.placement=nearest"])
        with pytest.raises(Exception, match="nodez"):
            compose("config", overrides=["cluster.nodez=[]"])


def test_bench_cluster_sim_runs_small_and_reports_the_summary_keys():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_cluster_sim.py"
    spec = importlib.util.spec_from_file_location("bench_cluster_sim", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(queries=60, nodes=2, devices=2, seed=1, scenario="mix")
    summary = result["summary"]
    assert set(summary) >= {"sim_place_vs_round_robin", "sim_place_gap"}
    assert summary["sim_place_vs_round_robin"] >= 1.0 and summary["sim_place_gap"] >= 0.0
    for row in result["rows"]:
        assert row["lower_bound_s"] <= row["makespan_s"] * (1 + 1e-9)


# --- late replicas: a device whose big model is done serves the last calls --------------------------------------

def test_a_late_replica_takes_its_device_over_only_after_the_device_s_own_calls():
    """Device 0 holds `big` (its only other replica is on device 1) and a late replica of `agg`; the aggregator's
    call may run there only once every `big` call is placed, its load starting when device 0's last call ends."""
    from compiler.passes.batch import Batch
    from compiler.passes.place import _earliest_finish

    batches = (Batch(0, "big", 0, ("a",), 0, 5.0), Batch(1, "big", 0, ("b",), 0, 5.0),
               Batch(2, "agg", 1, ("c",), 0, 1.0), Batch(3, "big", 1, ("d",), 0, 5.0))
    inputs_of = [(), (), (0,), (1,)]
    load_s = {"big": 2.0, "agg": 0.5}
    device, finish, ends, run_order, _ = _earliest_finish(
        batches, [0, 1, 3, 2], {"big": (0, 1), "agg": (0,)}, 2, load_s, inputs_of, frozenset({("agg", 0)}))
    on_0 = [i for i in run_order if device[i] == 0]
    assert device[2] == 0 and all(batches[i].model == "big" for i in on_0[:-1]) and on_0[-1] == 2
    big_end_0 = max(ends[i] for i in on_0[:-1])
    assert ends[2] == pytest.approx(big_end_0 + 0.5 + 1.0)  # load after the device's last big call, then run
    # while a `big` call is still to come in the order, the late replica is not offered: it would strand it
    device, _, ends, _, _ = _earliest_finish(batches, [0, 1, 2, 3], {"big": (0,), "agg": (0, 1)}, 2, load_s,
                                             inputs_of, frozenset({("agg", 0)}))
    assert device[2] == 1 and device[3] == 0


def test_demand_placement_with_models_that_fill_a_device_verifies_and_beats_round_robin():
    """Big models (7 GB of 10 GB devices) beside small ones: `demand` (late replicas and all) gives a plan that
    verifies, simulates within the devices' budgets, is no slower than round-robin, and stays above the bounds."""
    rng = random.Random(5)
    models = {f"big{i}": ModelCost(7 * GB, 1000, 1e-4, 2e-2, load_s=3.0) for i in range(2)}
    models |= {f"small{i}": ModelCost(GB, 1000, 1e-4, 5e-3, load_s=0.3) for i in range(2)}
    cost = CostModel(models, {"e0": "big0", "e1": "big1", "e2": "small0", "e3": "small1", "aggregator": "small0"})
    graph = random_graph(rng, ["e0", "e1", "e2", "e3"], n_queries=40)
    makespans = {}
    for policy in ("demand", "round_robin"):
        plan = compile(graph, cost, CompilerConfig(placement=policy, max_batch_size=4),
                       cluster=uniform_cluster(2, 3, 10 * GB))
        plan.verify(cost)
        sim = simulate(plan, cost)
        assert sim.peak_resident_bytes <= 10 * GB
        assert sim.lower_bound_s <= sim.makespan_s * (1 + 1e-9)
        makespans[policy] = sim.makespan_s
    assert makespans["demand"] <= makespans["round_robin"] * (1 + 1e-9)
