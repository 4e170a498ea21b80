"""The plan executor with deterministic fake models: every policy is a plan; same answers, batches as planned,
host steps for answers that need no call, evictions that really drop the model, traces."""
import gc
import time
import weakref

import pytest

from compiler.build import FinalAnswer
from compiler.ir import Graph
from compiler.plan import StepKind
from compllm.runtime.faults import RetryPolicy
from compllm.runtime.trace import chrome_trace
from fakes import EchoModel, FakePool, run, wall_query, workload

POLICIES = ["sequential", "level", "compiled"]


def pool(**models):
    return FakePool({"small": EchoModel("small"), "big": EchoModel("big"), **models})


def test_all_policies_give_identical_answers_with_fewer_calls():
    answers, calls = {}, {}
    for policy in POLICIES:
        p = pool()
        results, _, _ = run(policy, workload(), p)
        answers[policy] = {nid: r.answer for nid, r in results.items()}
        calls[policy] = sum(len(m.batches) for m in p.models.values())
        assert all(r.ok for r in results.values())
    assert answers["sequential"] == answers["level"] == answers["compiled"]
    assert calls["sequential"] == 7  # every node alone, the shared "15% of 240" included
    assert calls["compiled"] < calls["sequential"]  # batched + the shared "15% of 240" computed once


def test_each_node_runs_on_the_model_its_plan_step_names():
    results, plan, _ = run("compiled", workload(), pool())
    step_model = {n: s.model for s in plan.steps if s.kind is StepKind.GENERATE for n in s.nodes}
    for nid, res in results.items():
        assert res.model == step_model.get(plan.aliases.get(nid, nid), "")


@pytest.mark.parametrize("policy", POLICIES)
def test_joined_final_answers_are_host_steps_with_every_part_answer_unchanged(policy):
    p = pool()
    results, plan, _ = run(policy, workload(FinalAnswer.join), p)
    assert {s.nodes for s in plan.steps if s.kind is StepKind.HOST} == {("q0:agg",), ("q1:agg",)}
    q0 = results["q0:agg"]
    assert q0.model == "" and q0.answer == f"1. {results['q0:2'].answer}\n2. {results['q0:3'].answer}"
    assert results["q1:agg"].answer == f"1. {results['q1:1'].answer}\n2. {results['q1:2'].answer}"
    assert sum(len(m.batches) for m in p.models.values()) == plan.count(StepKind.GENERATE)


def test_deduplicated_node_reports_its_twin_answer():
    results, plan, _ = run("compiled", workload(), pool())
    assert plan.aliases == {"q1:1": "q0:3"}
    assert results["q1:1"].answer == results["q0:3"].answer and "q0:3" in results["q1:1"].note
    assert results["q1:1"].query_id == "q1"


def test_eager_dataflow_overlaps_independent_models():
    """Two models on two streams: the slow model's batch must not hold back the other model's chain."""
    p = FakePool({"small": EchoModel("small", delay=0.05), "big": EchoModel("big", delay=0.3)})
    results, plan, executor = run("compiled", wall_query(Graph()), p, streams=2)
    assert results["q0:2"].end < results["q0:3"].end, "q0's chain on `small` finishes while `big` is busy"
    trace = chrome_trace("compiled", results.values(), executor.step_records)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {1, 2} and all(e["dur"] >= 0 for e in xs)


def test_refilled_calls_reach_the_backend_with_the_plans_row_cap():
    """The compiler decides how many rows decode at once; the executor hands exactly that to the backend."""
    p = pool()
    results, plan, executor = run("compiled", workload(), p, max_batch_size=1, max_call_size=8)
    refilled = [s for s in plan.steps if s.slots]
    assert refilled and all(s.slots == 1 and len(s.nodes) > 1 for s in refilled)
    caps = p.models["small"].live_caps + p.models["big"].live_caps
    assert caps.count(1) == len(refilled) and set(caps) <= {1, None}
    assert all(r.ok for r in results.values())
    names = [e["name"] for e in chrome_trace("compiled", results.values(), executor.step_records)["traceEvents"]]
    assert sum("(1 at a time)" in n for n in names) == len(refilled)


def test_failed_batch_skips_dependents_and_the_final_answer_says_what_is_missing():
    p = pool(small=EchoModel("small", fail_on="Berlin Wall"))
    results, _, _ = run("compiled", workload(FinalAnswer.join), p, max_batch_size=1)
    assert results["q0:1"].status == "failed" and "refuses" in results["q0:1"].error
    assert results["q0:2"].status == "skipped" and "q0:1" in results["q0:2"].error
    final = results["q0:agg"]
    assert final.ok and final.answer.startswith("1. (not answered: depends on q0:1, which failed)")
    assert final.answer.endswith(f"2. {results['q0:3'].answer}") and results["q1:agg"].ok


def test_budget_forces_evictions_that_really_drop_the_model():
    """The pool is compllm's own: after the plan's evict step, nothing holds the evicted backend any more."""
    made = []

    class Factory(dict):
        def __missing__(self, alias):  # a fresh backend per load, referenced only by the pool
            model = EchoModel(alias)
            made.append(weakref.ref(model))
            return model

    p = FakePool(Factory())
    p.specs = {a: {"source": {"path": a}} for a in ("small", "big")}
    results, plan, _ = run("compiled", workload(), p, memory_budget=1100)
    assert plan.count(StepKind.EVICT) >= 1 and p.evicted and all(r.ok for r in results.values())
    gc.collect()
    assert sum(ref() is not None for ref in made) == len(p.loaded())  # only what is resident is alive


def test_a_fault_wrapper_lets_go_of_an_evicted_model():
    p = FakePool({})
    p.specs = {"chaos": {"source": {"path": "x"}, "fault_injection": {"enabled": True, "error_rate": 0.0}}}
    p.models = type("F", (dict,), {"__missing__": lambda self, a: EchoModel(a)})()
    backend = p.get("chaos")
    inner = weakref.ref(backend.inner)
    del backend
    p.evict("chaos")
    gc.collect()
    assert inner() is None


def test_a_generate_step_never_loads_a_model_the_plan_did_not_load():
    from compllm.backends.base import GenerationRequest
    from fakes import context

    p = pool()
    request = GenerationRequest(({"role": "user", "content": "hi"},), 4)
    (outcome,) = context(p).generate("small", [request], [RetryPolicy(3)], "gen:small#0")
    assert not outcome.ok and "not loaded" in outcome.error and outcome.attempts == 1 and not p.loads


class FlakyModel(EchoModel):
    """Fails the first `failures` calls, or hangs `hang` seconds (cancellable): faults a retry policy absorbs."""

    def __init__(self, name, failures=0, hang=0.0):
        super().__init__(name)
        self.failures, self.hang, self.calls, self.running = failures, hang, 0, 0

    def generate(self, requests, max_live_rows=None, cancel=None, on_text=None):
        from compllm.backends.base import BackendError

        self.calls += 1
        if self.calls <= self.failures:
            raise BackendError("transient failure")
        if self.hang:
            self.running += 1
            try:
                if cancel.wait(self.hang):
                    raise BackendError("cancelled")
            finally:
                self.running -= 1
        return super().generate(requests)


@pytest.mark.parametrize("policy", ["sequential", "compiled"])
def test_transient_failure_is_retried(policy):
    p = pool(small=FlakyModel("small", failures=1))
    results, _, _ = run(policy, workload(), p, RetryPolicy(max_attempts=2, backoff_s=0.01))
    assert all(r.ok for r in results.values())
    assert max(r.attempts for r in results.values()) == 2


def test_hung_call_is_cancelled_and_its_step_ends_only_when_the_call_has_stopped():
    """The evict after a timed-out call must not run while the call still holds the model."""
    hung = FlakyModel("big", hang=5.0)
    p = pool(big=hung)
    seen_running_at_evict = []
    original_evict = p.evict
    p.evict = lambda alias: (seen_running_at_evict.append(hung.running), original_evict(alias))
    start = time.perf_counter()
    results, plan, _ = run("sequential", workload(), p, RetryPolicy(max_attempts=1, timeout_s=0.2),
                           memory_budget=1100)
    assert time.perf_counter() - start < 3  # the hung expert cost its timeout, not its hang
    assert results["q0:3"].status == "failed" and "longer than 0.2 s" in results["q0:3"].error
    assert results["q0:agg"].ok and results["q0:1"].ok
    assert plan.count(StepKind.EVICT) and seen_running_at_evict and not any(seen_running_at_evict)


def test_a_bug_in_a_backend_is_not_retried_but_fails_its_nodes_with_the_reason():
    class Buggy(EchoModel):
        def generate(self, requests, max_live_rows=None, cancel=None, on_text=None):
            self.batches.append(len(requests))
            raise KeyError("oops")

    p = pool(big=Buggy("big"))
    results, _, _ = run("compiled", workload(), p, RetryPolicy(max_attempts=3, backoff_s=0.0))
    assert results["q0:3"].status == "failed" and results["q0:3"].error == "KeyError: 'oops'"
    assert results["q0:3"].attempts == 1 and p.models["big"].batches == [1]  # tried once: a bug is not a fault


def test_per_expert_retry_policies_decide_how_often_each_node_is_tried():
    from compllm.experts import Expert
    from fakes import EXPERTS

    p = pool(small=FlakyModel("small", failures=99), big=FlakyModel("big", failures=99))
    experts = {**EXPERTS, "math": Expert("math", "d", "big", "sys", retry=RetryPolicy(max_attempts=3, backoff_s=0.0))}
    results, _, _ = run("compiled", wall_query(Graph()), p, RetryPolicy(max_attempts=1, backoff_s=0.0),
                        experts=experts)
    assert results["q0:3"].attempts == 3 and results["q0:1"].attempts == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_increments_submitted_while_running_give_the_one_shot_answers(policy):
    """Online: queries compiled one at a time into increments, each submitted while the earlier ones run."""
    import random

    from compiler import CompilerConfig
    from compiler.online import OnlineCompiler
    from fakes import POLICIES as SETTINGS
    from fakes import context, cost

    one_shot, _, _ = run(policy, workload(), pool())
    barrier, settings = SETTINGS[policy]
    graph = workload()
    p = FakePool({"small": EchoModel("small", delay=0.02), "big": EchoModel("big", delay=0.02)})
    online = OnlineCompiler(cost(), CompilerConfig(**settings))
    from compllm.runtime.executor import PlanExecutor

    live = PlanExecutor(policy, barrier).start(context(p))
    rng = random.Random(0)
    for qid in graph.queries:  # a query at a time, its nodes in order, while earlier work runs
        nodes = [n for n in graph if n.provenance.query_id == qid]
        online.add(nodes, [graph.queries[qid]])
        live.submit(online.compile(), online.graph, online.plan.aliases)
        time.sleep(rng.random() * 0.03)
    live.close()
    assert live.join(timeout=30)
    results = live.finish(graph)
    assert {n: r.answer for n, r in results.items()} == {n: r.answer for n, r in one_shot.items()}
    assert all(r.ok for r in results.values())
