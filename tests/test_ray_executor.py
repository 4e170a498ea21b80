"""The Ray executor on a real two-node Ray cluster started here (a head and a worker node, each named by a custom
resource), SmolLM2-135M (fp32, greedy) on each node: the same answers as the local executor on the same plan, one
trace row per actor, a placement the cluster lacks refused up front, and an actor killed mid-call either restarted
by Ray and the step retried (answered once) or, with no restart, the step failed with the reason and its
dependents skipped. Select with `pytest -k ray`; skipped with the reason when Ray is not installed."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compiler import CompilerConfig, compile
from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import AGGREGATOR, Graph
from compiler.plan import Plan, StepKind
from compllm.backends.pool import ModelPool
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.faults import RetryPolicy
from compllm.runtime.trace import chrome_trace
from fakes import context, cost, wall_query

ray = pytest.importorskip("ray", reason="Ray is not installed: `make setup-ray` (pip install 'compllm[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from compllm.runtime.ray_executor import ActorLostError, RayClusterConfig, RayExecutor, UnknownNodeError  # noqa: E402

pytestmark = pytest.mark.model
CONF = str(Path(__file__).resolve().parents[1] / "conf")
NODES = {"small": "n0", "big": "n1"}  # model alias -> the Ray node (custom resource) that holds it
MIB = 2**20


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node (`n0`) and a worker node (`n1`) on this machine: 1 CPU each, small object stores, no
    dashboard; shut down at the end of the module."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"n0": 1}, "object_store_memory": 80 * MIB, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"n1": 1}, object_store_memory=80 * MIB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="compllm-test", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in every actor: on a shared 2-core box, OpenMP threads meeting at barriers are
    far slower when oversubscribed, and equal thread counts keep the fp32 sums identical on both sides."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(model_cache):
    """SmolLM2-135M fp32 on CPU as two aliases (`small`, `big`): one shared copy locally, one actor each on Ray.
    Loaded here first, so the actors find the converted weights in the cache."""
    from hydra import compose, initialize_config_dir

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2-135m", "models.default.dtype=float32",
                                           "models.default.device=cpu", f"cache_dir={model_cache}"])
    spec = OmegaConf.to_container(cfg.models.default, resolve=True, enum_to_str=True)
    pool = ModelPool({"small": spec, "big": spec}, cache_dir=model_cache)
    pool.get("small")
    return pool


def placed(plan: Plan, nodes: dict[str, str]) -> Plan:
    """What the `place` pass will write: each model's load/generate/evict steps name its node."""
    steps = [dataclasses.replace(s, node=nodes[s.model]) if s.model in nodes and
             s.kind in (StepKind.LOAD, StepKind.GENERATE, StepKind.EVICT) else s for s in plan.steps]
    return dataclasses.replace(plan, steps=steps)


def executor(max_restarts: int = 1) -> RayExecutor:
    return RayExecutor("compiled", cluster=RayClusterConfig(max_restarts=max_restarts, threads=1))


def compound() -> tuple[Graph, Plan]:
    """One query of three sub-queries on two models (`general` -> small, `math` -> big), #2 needing #1's answer."""
    g = wall_query(Graph(), FinalAnswer.join)
    return g, compile(g, cost(), CompilerConfig(streams=1), resident={})


def test_ray_compound_query_across_two_nodes_answers_as_the_local_executor(ray_cluster, smol):
    graph, plan = compound()
    local = PlanExecutor("compiled").run(plan, context(smol), graph)
    ex = executor()
    try:
        remote = ex.run(placed(plan, NODES), context(smol), graph)
        where = {label: ray.get(actor.ready.remote())["node_id"] for label, actor in
                 ((f"{m}@{n}", a) for (m, n), a in ex.replicas.actors.items())}
    finally:
        ex.shutdown()
    assert all(r.ok for r in local.values()), {k: r.error for k, r in local.items() if not r.ok}
    assert {k: (r.status, r.answer) for k, r in remote.items()} == {k: (r.status, r.answer) for k, r in local.items()}
    assert {r.model for r in remote.values()} == {"small", "big", ""}
    # one actor per model replica, on two different Ray nodes; every model step ran on its actor
    assert set(where) == {"small@n0", "big@n1"} and len(set(where.values())) == 2
    workers = {r.step_id: r.worker for r in ex.step_records}
    for s in plan.steps:
        assert workers[s.id] == (f"{s.model}@{NODES[s.model]}" if s.model else "")
    rows = {e["args"]["name"] for e in chrome_trace("compiled", remote.values(), ex.step_records)["traceEvents"]
            if e.get("name") == "thread_name"}
    assert {"actor small@n0", "actor big@n1"} <= rows


def test_ray_unknown_node_is_refused_before_any_step_runs(ray_cluster, smol):
    graph, plan = compound()
    ex = executor()
    with pytest.raises(UnknownNodeError, match=r"'n7'.*cluster nodes: n0, n1"):
        ex.run(placed(plan, {"small": "n0", "big": "n7"}), context(smol), graph)
    assert not ex.replicas.actors and not ex.step_records


def story() -> tuple[Graph, Plan]:
    """A long generation on `small` (#1) and a sub-query that needs its answer (#2)."""
    g = Graph()
    add_query(g, "q0", "Tell a story, then title it.", [
        RoutedSubQuery(1, "Write a long story about a dragon who learns to bake bread.", (), "general",
                       max_new_tokens=32),
        RoutedSubQuery(2, "Give a short title for this story: #1", (1,), "general", max_new_tokens=8),
    ], AGGREGATOR, 16, final=FinalAnswer.join)
    return g, compile(g, cost(), CompilerConfig(), resident={})


def kill_mid_call(ex: RayExecutor, model: str, node: str, deadline_s: float = 120) -> None:
    """Wait until the replica is inside a generate call, then kill it (Ray may restart it)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        actor = ex.replicas.actors.get((model, node))
        if actor is not None and ray.get(actor.busy.remote()):
            ray.kill(actor, no_restart=False)
            return
        time.sleep(0.05)
    raise AssertionError(f"{model}@{node} never started a call")


def run_and_kill(ex: RayExecutor, graph: Graph, plan: Plan, smol) -> dict:
    out: dict = {}
    retry = RetryPolicy(max_attempts=2, backoff_s=0.1)
    worker = threading.Thread(target=lambda: out.update(ex.run(plan, context(smol, retry), graph)))
    worker.start()
    try:
        kill_mid_call(ex, "small", "n0")
    finally:
        worker.join(300)
    assert not worker.is_alive()
    return out


def test_ray_actor_killed_mid_call_is_restarted_and_the_step_retried_once(ray_cluster, smol):
    graph, plan = story()
    local = PlanExecutor("compiled").run(plan, context(smol), graph)
    ex = executor(max_restarts=1)
    try:
        results = run_and_kill(ex, graph, placed(plan, {"small": "n0"}), smol)
        stats = ex.replica_stats()
    finally:
        ex.shutdown()
    first = results["q0:1"]
    assert first.ok and first.attempts == 2, (first.status, first.error)
    assert {k: r.answer for k, r in results.items()} == {k: r.answer for k, r in local.items()}
    # the restarted replica (a new process, model reloaded) made each call once: the killed call is not replayed
    gens = [s for s in plan.steps if s.kind is StepKind.GENERATE]
    assert stats["small@n0"]["calls"] == len(gens)
    assert [r.step_id for r in ex.step_records].count(gens[0].id) == 1


def test_ray_actor_killed_without_restart_fails_the_step_and_skips_dependents(ray_cluster, smol):
    graph, plan = story()
    ex = executor(max_restarts=0)
    try:
        results = run_and_kill(ex, graph, placed(plan, {"small": "n0"}), smol)
    finally:
        ex.shutdown()
    first, second = results["q0:1"], results["q0:2"]
    assert first.status == "failed" and ActorLostError.__name__ in first.error and "small@n0" in first.error
    assert second.status == "skipped" and second.error == "depends on q0:1, which failed"
    assert results["q0:agg"].status == "failed" and "no part was answered" in results["q0:agg"].error


def test_ray_place_pass_on_the_discovered_cluster_keeps_two_models_apart_and_answers_as_locally(ray_cluster, smol):
    """The whole path on the real cluster: its nodes discovered from Ray, a per-device budget that holds one model
    but not both, the `place` pass putting `small` and `big` on different nodes, the Ray executor running that plan
    with the local executor's answers."""
    from compiler.cluster import ClusterSpec
    from compllm.cluster import resolve_cluster

    graph, plain = compound()
    one = max(plain.footprints.values())
    spec = resolve_cluster(ClusterSpec("ray", discover=True, device_memory=int(one * 1.5)))
    assert sorted(n.name for n in spec.nodes) == ["n0", "n1"]
    plan = compile(graph, cost(), CompilerConfig(streams=1), resident={}, cluster=spec)  # verifies per device
    where = {s.model: s.node for s in plan.steps if s.kind is StepKind.LOAD}
    assert set(where) == {"small", "big"} and where["small"] != where["big"]
    assert all(s.node for s in plan.steps if s.kind is not StepKind.HOST)
    local = PlanExecutor("compiled").run(plain, context(smol), graph)
    ex = executor()
    try:
        remote = ex.run(plan, context(smol), graph)
    finally:
        ex.shutdown()
    assert {k: (r.status, r.answer) for k, r in remote.items()} == {k: (r.status, r.answer) for k, r in local.items()}
