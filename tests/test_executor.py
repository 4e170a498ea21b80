"""The plan executor with a deterministic fake model: same answers as sequential, batches as planned, traces."""
import threading
import time

import pytest

from compiler import CompilerConfig, CostModel, ModelCost, compile
from compiler.build import RoutedSubQuery, add_query
from compiler.ir import Graph
from compllm.backends.base import BackendError, Generation, ModelStats
from compllm.experts import Expert
from compllm.runtime.context import AGGREGATOR, ExecutionContext
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.prompts import Aggregator
from compllm.runtime.sequential import SequentialExecutor
from compllm.runtime.trace import chrome_trace


class EchoModel:
    """Answer = a stable function of the prompt, so any schedule must give the same answers."""

    def __init__(self, name, delay=0.0, fail_on=None):
        self.name, self.stats, self.delay, self.fail_on = name, ModelStats(), delay, fail_on
        self.batches: list[int] = []
        self.live_caps: list[int | None] = []  # max_live_rows of each call
        self.lock = threading.Lock()

    def generate(self, requests, max_live_rows=None):
        with self.lock:
            self.batches.append(len(requests))
            self.live_caps.append(max_live_rows)
        time.sleep(self.delay)
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            if self.fail_on and self.fail_on in user:
                raise BackendError(f"{self.name} refuses")
            out.append(Generation(f"{self.name}:{sum(map(ord, user)) % 9973}", 10, 2, self.delay, "stop", len(requests)))
        return out


class Pool:
    def __init__(self, models):
        self.models, self.evicted = models, []

    def get(self, alias):
        return self.models[alias]

    def evict(self, alias):
        self.evicted.append(alias)


EXPERTS = {name: Expert(name, "d", model, "sys") for name, model in
           [("general", "small"), ("math", "big"), ("medicine", "small")]}


def wall_query(g: Graph) -> Graph:
    """q0: a two-step `general` chain (#2 needs #1) beside an independent `math` sub-query."""
    add_query(g, "q0", "PM when the Wall fell, and 15% of 240?", [
        RoutedSubQuery(1, "In what year did the Berlin Wall fall?", (), "general", max_new_tokens=8),
        RoutedSubQuery(2, "Who was the British prime minister in #1?", (1,), "general", max_new_tokens=8),
        RoutedSubQuery(3, "What is 15% of 240?", (), "math", max_new_tokens=8),
    ], AGGREGATOR, 16)
    return g


def workload() -> Graph:
    g = wall_query(Graph())
    add_query(g, "q1", "15% of 240, and scurvy?", [
        RoutedSubQuery(1, "What is 15% of 240?", (), "math", max_new_tokens=8),
        RoutedSubQuery(2, "Which vitamin prevents scurvy?", (), "medicine", max_new_tokens=8),
    ], AGGREGATOR, 16)
    return g


def cost(budget_models=("small", "big")) -> CostModel:
    mc = ModelCost(weight_bytes=1000, kv_bytes_per_token=1, prefill_s_per_token=0.001, decode_s_per_token=0.01)
    return CostModel({m: mc for m in budget_models},
                     {"general": "small", "math": "big", "medicine": "small", AGGREGATOR: "small"})


def context(pool):
    return ExecutionContext(pool, EXPERTS, Aggregator("small", "Combine.", skip_single=False))


def run(policy, graph, pool, config=None):
    plan = compile(graph, cost(), config or CompilerConfig()) if policy.needs_plan else None
    return policy.run(graph, context(pool), plan=plan), plan


def test_all_policies_give_identical_answers_with_fewer_calls():
    answers, calls = {}, {}
    for policy in (SequentialExecutor(), PlanExecutor("level", barrier=True), PlanExecutor("compiled")):
        pool = Pool({"small": EchoModel("small"), "big": EchoModel("big")})
        results, _ = run(policy, workload(), pool)
        answers[policy.name] = {nid: r.answer for nid, r in results.items()}
        calls[policy.name] = sum(len(m.batches) for m in pool.models.values())
        assert all(r.ok for r in results.values())
    assert answers["sequential"] == answers["level"] == answers["compiled"]
    assert calls["sequential"] == 7  # every node alone
    assert calls["compiled"] < calls["sequential"]  # batched + the shared "15% of 240" computed once


def test_deduplicated_node_reports_its_twin_answer():
    pool = Pool({"small": EchoModel("small"), "big": EchoModel("big")})
    results, plan = run(PlanExecutor(), workload(), pool)
    assert plan.aliases == {"q1:1": "q0:3"}
    assert results["q1:1"].answer == results["q0:3"].answer and "q0:3" in results["q1:1"].note
    assert results["q1:1"].query_id == "q1"


def test_eager_dataflow_overlaps_independent_models():
    """Two models on two streams: the slow model's batch must not hold back the other model's chain."""
    g = wall_query(Graph())
    pool = Pool({"small": EchoModel("small", delay=0.05), "big": EchoModel("big", delay=0.3)})
    policy = PlanExecutor()
    results, plan = run(policy, g, pool, CompilerConfig(streams=2))
    big = results["q0:3"]
    chain_end = results["q0:2"].end
    assert chain_end < big.end, "q0's two-step chain on `small` should finish while `big` is still busy"
    trace = chrome_trace("compiled", results.values(), policy.step_records)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == {1, 2} and all(e["dur"] >= 0 for e in xs)


def test_refilled_calls_reach_the_backend_with_the_plans_row_cap():
    """The compiler decides how many rows decode at once; the executor hands exactly that to the backend."""
    pool = Pool({"small": EchoModel("small"), "big": EchoModel("big")})
    policy = PlanExecutor()
    results, plan = run(policy, workload(), pool, CompilerConfig(max_batch_size=1, max_call_size=8))
    refilled = [s for s in plan.steps if s.slots]
    assert refilled and all(s.slots == 1 and len(s.nodes) > 1 for s in refilled)
    caps = pool.models["small"].live_caps + pool.models["big"].live_caps
    assert caps.count(1) == len(refilled) and set(caps) <= {1, None}
    assert all(r.ok for r in results.values())
    names = [e["name"] for e in chrome_trace("compiled", results.values(), policy.step_records)["traceEvents"]]
    assert sum("(1 at a time)" in n for n in names) == len(refilled)


def test_failed_batch_skips_dependents_and_aggregates_anyway():
    pool = Pool({"small": EchoModel("small", fail_on="Berlin Wall"), "big": EchoModel("big")})
    results, _ = run(PlanExecutor(), workload(), pool, CompilerConfig(max_batch_size=1))
    assert results["q0:1"].status == "failed" and "refuses" in results["q0:1"].error
    assert results["q0:2"].status == "skipped"
    assert results["q0:agg"].status in {"ok", "failed"}  # its prompt names the failure, so it may be refused too
    assert results["q1:agg"].ok


def test_budget_forces_evictions_that_the_executor_carries_out():
    pool = Pool({"small": EchoModel("small"), "big": EchoModel("big")})
    results, plan = run(PlanExecutor(), workload(), pool, CompilerConfig(memory_budget=1100))
    assert plan.count(plan.steps[0].kind.__class__("evict")) >= 1
    assert pool.evicted and all(r.ok for r in results.values())


def test_executor_without_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="executes a compiled plan"):
        PlanExecutor().run(workload(), context(Pool({})))


class FlakyModel(EchoModel):
    """Fails the first `failures` calls, or sleeps `hang` seconds: the faults a retry policy must absorb."""

    def __init__(self, name, failures=0, hang=0.0):
        super().__init__(name)
        self.failures, self.hang, self.calls = failures, hang, 0

    def generate(self, requests, max_live_rows=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendError("transient failure")
        if self.hang:
            time.sleep(self.hang)
        return super().generate(requests)


@pytest.mark.parametrize("policy", [SequentialExecutor(), PlanExecutor()], ids=["sequential", "compiled"])
def test_transient_failure_is_retried(policy):
    from compllm.runtime.faults import RetryPolicy

    pool = Pool({"small": FlakyModel("small", failures=1), "big": EchoModel("big")})
    ctx = ExecutionContext(pool, EXPERTS, Aggregator("small", "Combine.", skip_single=False),
                           retry=RetryPolicy(max_attempts=2, backoff_s=0.01))
    plan = compile(workload(), cost()) if policy.needs_plan else None
    results = policy.run(workload(), ctx, plan=plan)
    assert all(r.ok for r in results.values())
    assert max(r.attempts for r in results.values()) == 2


def test_hung_call_times_out_and_dependents_are_skipped():
    from compllm.runtime.faults import RetryPolicy

    pool = Pool({"small": EchoModel("small"), "big": FlakyModel("big", hang=2.0)})
    ctx = ExecutionContext(pool, EXPERTS, Aggregator("small", "Combine.", skip_single=False),
                           retry=RetryPolicy(max_attempts=1, timeout_s=0.2))
    start = time.perf_counter()
    results = SequentialExecutor().run(workload(), ctx)
    assert time.perf_counter() - start < 1.5  # the hung expert cost its timeout, not its hang
    assert results["q0:3"].status == "failed" and "longer than 0.2 s" in results["q0:3"].error
    assert results["q0:agg"].ok and results["q0:1"].ok
