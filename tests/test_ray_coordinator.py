"""The Ray executor's asyncio coordinator, without Ray: a plan with no placed step runs every step in this process,
so fake models check the coordinator itself: the local executor's answers and calls for every policy, eager overlap
across streams, plan increments fed while it runs, and an executor bug re-raised instead of a hang."""
import threading

import pytest

from compiler import CompilerConfig, compile
from compiler.build import FinalAnswer
from compiler.ir import Graph
from compiler.plan import StepKind
from compllm.runtime.ray_executor import RayExecutor
from fakes import POLICIES, EchoModel, FakePool, context, cost, run, wall_query, workload


def pool(**kw):
    return FakePool({"small": EchoModel("small", **kw), "big": EchoModel("big", **kw)})


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ray_coordinator_gives_the_local_executors_answers_and_calls(policy):
    local_pool, ray_pool = pool(), pool()
    local, plan, _ = run(policy, workload(), local_pool)
    barrier, _ = POLICIES[policy]
    ex = RayExecutor(policy, barrier=barrier)
    remote = ex.run(plan, context(ray_pool), workload())
    assert {k: (r.status, r.answer) for k, r in remote.items()} == {k: (r.status, r.answer) for k, r in local.items()}
    assert {a: m.batches for a, m in ray_pool.models.items()} == {a: m.batches for a, m in local_pool.models.items()}
    assert sorted(r.step_id for r in ex.step_records) == sorted(s.id for s in plan.steps)
    assert not any(r.worker for r in ex.step_records)  # nothing placed: every step ran here, on its stream's row


def test_ray_coordinator_overlaps_independent_streams():
    p = FakePool({"small": EchoModel("small", delay=0.05), "big": EchoModel("big", delay=0.3)})
    g = wall_query(Graph())
    plan = compile(g, cost(), CompilerConfig(streams=2), resident={})
    results = RayExecutor("compiled").run(plan, context(p), g)
    assert results["q0:2"].end < results["q0:3"].end, "the chain on `small` finishes while `big` is busy"


def test_ray_coordinator_takes_plan_increments_while_running():
    p = pool(delay=0.02)
    g = workload()
    plan = compile(g, cost(), CompilerConfig(), resident={})
    answered = []
    live = RayExecutor("compiled").start(context(p), on_answer=lambda nid, res: answered.append(nid))
    half = len(plan.steps) // 2
    live.submit(plan.steps[:half], plan.graph, plan.aliases)
    threading.Event().wait(0.05)
    live.submit(plan.steps[half:], plan.graph, plan.aliases)
    live.close()
    assert live.join(30)
    results = live.finish(g)
    assert all(r.ok for r in results.values())
    assert set(answered) >= {nid for s in plan.steps if s.kind in (StepKind.GENERATE, StepKind.HOST) for nid in s.nodes}


def test_ray_coordinator_reraises_an_executor_bug(monkeypatch):
    """A bug in a step (here: the host step) ends the run with that exception, not a hang."""
    from compllm.runtime import ray_executor

    g = workload(FinalAnswer.join)
    plan = compile(g, cost(), CompilerConfig(), resident={})
    assert plan.count(StepKind.HOST)
    monkeypatch.setattr(ray_executor.RayRun, "_host", lambda self, step: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError, match="bug"):
        RayExecutor("compiled").run(plan, context(pool()), g)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # LiveRun re-raises it there too
def test_ray_coordinator_ends_an_open_run_on_an_executor_bug(monkeypatch):
    """Online (no close yet): the bug still ends the run, and join() re-raises it."""
    from compllm.runtime import ray_executor

    g = workload(FinalAnswer.join)
    plan = compile(g, cost(), CompilerConfig(), resident={})
    monkeypatch.setattr(ray_executor.RayRun, "_host", lambda self, step: (_ for _ in ()).throw(KeyError("bug")))
    live = RayExecutor("compiled").start(context(pool()))
    live.submit(plan.steps, plan.graph, plan.aliases)
    with pytest.raises(KeyError, match="bug"):
        live.join(30)
    assert live._finished.is_set()
