"""Fault injection: errors, hangs, empty text and out-of-memory are retried, then fail only their own node;
dependents are skipped with the reason, the query still gets an answer (marked partial), the batch survives."""
import time
from collections import Counter

import pytest

from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import AGGREGATOR, Graph
from compllm.backends.base import BackendError, Generation
from compllm.backends.faulty import FaultSettings, FaultyModel, InjectedOutOfMemory
from compllm.backends.pool import ModelPool
from compllm.runtime.faults import Fault, RetryPolicy, generate_with_retry
from fakes import FAST, EchoModel, FakePool, cost, run, wall_query, workload

POLICIES = ["sequential", "level", "compiled"]


def gen(model):
    """A backend's generate as the retry loop calls it: (batch, cancel)."""
    return lambda batch, cancel: model.generate(batch, cancel=cancel)


class EmptyOnce(EchoModel):
    """Blank answer for prompts containing `word` on their first `times` calls; everything else answered."""

    def __init__(self, name, word, times=1):
        super().__init__(name)
        self.word, self.times, self.seen = word, times, Counter()

    def generate(self, requests, max_live_rows=None, cancel=None, on_text=None):
        out = super().generate(requests)
        for i, r in enumerate(requests):
            user = r.messages[-1]["content"]
            if self.word in user and self.seen[user] < self.times:
                self.seen[user] += 1
                out[i] = Generation("  \n", 1, 0, 0.0)
        return out


def partial(results, qid):
    return not all(r.ok for r in results.values() if r.query_id == qid)


# --------------------------------------------------------------------------- the wrapper itself


def test_rates_are_seeded_and_each_kind_is_what_it_claims():
    settings = FaultSettings(enabled=True, seed=7, error_rate=0.2, oom_rate=0.2, hang_rate=0.2, empty_rate=0.3,
                             hang_s=0.0)
    kinds = []
    for _ in range(2):
        model, seen = FaultyModel(EchoModel("m"), settings), Counter()
        for i in range(300):
            try:
                gens = model.generate([_request(f"q{i}")])
                seen["empty" if not gens[0].text else "ok"] += 1
            except InjectedOutOfMemory as exc:
                assert isinstance(exc, MemoryError) and "out of memory" in str(exc)
                seen["oom"] += 1
            except BackendError:
                seen["error"] += 1
        kinds.append((seen, dict(model.injected)))
    assert kinds[0] == kinds[1]  # same seed, same faults
    seen, injected = kinds[0]
    assert seen["error"] == injected["error"] and seen["oom"] == injected["oom"]
    assert seen["empty"] == injected["empty"]
    for kind, rate in (("error", 0.2), ("oom", 0.2), ("hang", 0.2)):
        assert abs(injected[kind] / 300 - rate) < 0.08, (kind, injected)


def _request(text):
    from compllm.backends.base import GenerationRequest

    return GenerationRequest(({"role": "user", "content": text},), 4)


def test_wrapper_passes_through_the_inner_backends_attributes():
    inner = EchoModel("inner")
    wrapped = FaultyModel(inner, FaultSettings(enabled=True))
    assert wrapped.name == "inner" and wrapped.stats is inner.stats and wrapped.batches is inner.batches


def test_invalid_rates_are_refused_with_the_fix():
    with pytest.raises(BackendError, match=r"error_rate=1.5 must be between 0 and 1"):
        FaultyModel(EchoModel("m"), FaultSettings(error_rate=1.5))
    with pytest.raises(BackendError, match="must be at most 1"):
        FaultyModel(EchoModel("m"), FaultSettings(error_rate=0.6, hang_rate=0.6))


def test_pool_wraps_only_aliases_with_fault_injection_enabled(monkeypatch):
    specs = {"plain": {"source": {"path": "x"}}, "chaos": {"source": {"path": "x"},
                                                           "fault_injection": {"enabled": True, "error_rate": 1.0}}}
    pool = ModelPool(specs)
    shared = EchoModel("x")
    monkeypatch.setattr(pool, "_load", lambda alias: shared)
    assert isinstance(pool.get("chaos"), FaultyModel) and not isinstance(pool.get("plain"), FaultyModel)
    assert pool.get("chaos").inner is pool.get("plain")  # one shared copy of the weights, faults per alias
    assert pool.get("chaos") is pool.get("chaos")  # one seeded wrapper, not a fresh one per call
    with pytest.raises(BackendError, match="injected"):
        pool.get("chaos").generate([_request("hi")])


# --------------------------------------------------------------------------- retry semantics


def test_empty_text_is_a_failed_attempt_retried_for_that_request_only():
    model = EmptyOnce("m", "two")
    reqs = [_request("one"), _request("two"), _request("three")]
    outcomes = generate_with_retry(gen(model), reqs, FAST, "t")
    assert all(o.ok and o.generation.text.strip() for o in outcomes)
    assert [o.attempts for o in outcomes] == [1, 2, 1]
    assert model.batches == [3, 1]  # the retry asked only for the blank one


def test_empty_text_after_every_attempt_fails_only_its_own_request():
    model = EmptyOnce("m", "two", times=99)
    outcomes = generate_with_retry(gen(model), [_request("one"), _request("two")], FAST, "t")
    assert outcomes[0].ok and not outcomes[1].ok
    assert "EmptyGenerationError" in outcomes[1].error and outcomes[1].attempts == 3


def test_backoff_doubles_between_attempts(monkeypatch):
    waits = []
    monkeypatch.setattr("compllm.runtime.faults.time.sleep", waits.append)
    always = FaultyModel(EchoModel("m"), FaultSettings(enabled=True, error_rate=1.0))
    (outcome,) = generate_with_retry(gen(always), [_request("x")], RetryPolicy(4, backoff_s=0.1), "t")
    assert not outcome.ok and outcome.attempts == 4 and "InjectedFault" in outcome.error
    assert waits == pytest.approx([0.1, 0.2, 0.4])


def test_wrong_number_of_generations_is_a_failed_attempt():
    outcomes = generate_with_retry(lambda batch, cancel: [], [_request("a")], RetryPolicy(2, 0.0), "t")
    assert not outcomes[0].ok and "0 generations for 1 requests" in outcomes[0].error


def test_retry_on_limits_which_faults_are_retried():
    always = FaultyModel(EchoModel("m"), FaultSettings(enabled=True, oom_rate=1.0))
    only_errors = RetryPolicy(4, backoff_s=0.0, retry_on=[Fault.error, Fault.timeout])
    (outcome,) = generate_with_retry(gen(always), [_request("x")], only_errors, "t")
    assert not outcome.ok and outcome.attempts == 1 and "InjectedOutOfMemory" in outcome.error
    (outcome,) = generate_with_retry(gen(always), [_request("x")], RetryPolicy(4, backoff_s=0.0), "t")
    assert outcome.attempts == 4


# --------------------------------------------------------------------------- through the executors


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["error", "oom", "empty"])
def test_a_fault_on_every_attempt_skips_dependents_and_the_query_answers_partially(policy, kind):
    """`general` (model small) always faults; `math` (model big) works: q0:1 fails, q0:2 is skipped naming
    q0:1, q0:3 answers, and the aggregator still answers q0 from what exists."""
    rate = {"error": "error_rate", "oom": "oom_rate", "empty": "empty_rate"}[kind]
    small = FaultyModel(EchoModel("small"), FaultSettings(enabled=True, **{rate: 1.0}))
    graph = wall_query(Graph())
    pool = FakePool({"small": small, "big": EchoModel("big")})
    results, _, _ = run(policy, graph, pool, FAST, cost("big"))
    assert results["q0:1"].status == "failed" and results["q0:1"].attempts == 3
    assert {"error": "InjectedFault", "oom": "InjectedOutOfMemory", "empty": "EmptyGenerationError"}[kind] in \
        results["q0:1"].error
    assert results["q0:2"].status == "skipped" and "q0:1" in results["q0:2"].error
    assert results["q0:3"].ok and results["q0:agg"].ok and results["q0:agg"].answer.startswith("big:")
    assert partial(results, "q0")
    assert "(no answer:" in results["q0:agg"].prompt and small.injected[kind] >= 3


@pytest.mark.parametrize("policy", POLICIES)
def test_transient_faults_are_recovered_by_retry(policy):
    """Every node's first attempt is blanked or raises; the second succeeds: every answer as without faults."""
    clean, _, _ = run(policy, workload(), FakePool({"small": EchoModel("small"), "big": EchoModel("big")}), FAST)
    flaky = {"small": EmptyOnce("small", ""), "big": EmptyOnce("big", "")}
    results, _, _ = run(policy, workload(), FakePool(flaky), FAST)
    assert {k: r.answer for k, r in results.items()} == {k: r.answer for k, r in clean.items()}
    assert all(r.ok for r in results.values())
    assert max(r.attempts for r in results.values()) == 2


def test_hang_past_the_timeout_is_cut_and_retried():
    hang = FaultyModel(EchoModel("big"), FaultSettings(enabled=True, seed=1, hang_rate=1.0, hang_s=1.0))
    pool = FakePool({"small": EchoModel("small"), "big": hang})
    start = time.perf_counter()
    results, _, _ = run("sequential", wall_query(Graph()), pool, RetryPolicy(2, backoff_s=0.01, timeout_s=0.1))
    assert time.perf_counter() - start < 0.9  # two 0.1 s timeouts, not two 1 s hangs
    assert results["q0:3"].status == "failed" and "longer than 0.1 s" in results["q0:3"].error
    assert results["q0:3"].attempts == 2 and results["q0:agg"].ok and hang.injected["hang"] == 2


@pytest.mark.parametrize("policy", POLICIES)
def test_one_failing_query_never_sinks_the_batch(policy):
    """q1's every sub-query hits a model that always fails; q0 and q2 are untouched, and q1 still gets a result."""
    graph = Graph()
    for qid, expert in (("q0", "general"), ("q1", "math"), ("q2", "medicine")):
        add_query(graph, qid, f"{qid}?", [RoutedSubQuery(1, f"{qid} first?", (), expert),
                                          RoutedSubQuery(2, f"{qid} uses #1?", (1,), expert)], AGGREGATOR,
                  final=FinalAnswer.model)
    always = FaultyModel(EchoModel("big"), FaultSettings(enabled=True, error_rate=0.5, oom_rate=0.5))
    results, _, _ = run(policy, graph, FakePool({"small": EchoModel("small"), "big": always}), FAST)
    assert not partial(results, "q0") and not partial(results, "q2")
    assert results["q1:1"].status == "failed" and results["q1:2"].status == "skipped"
    assert results["q1:agg"].ok and partial(results, "q1")


@pytest.mark.parametrize("policy", POLICIES)
def test_seeded_chaos_campaign_ends_every_node_in_a_known_state(policy):
    """Mixed faults at 30% on every model: every node ends ok/failed/skipped with a reason, every sink has a result."""
    settings = dict(enabled=True, seed=3, error_rate=0.1, oom_rate=0.1, empty_rate=0.15)
    graph = Graph()
    for q in range(6):
        add_query(graph, f"q{q}", f"query {q}?", [
            RoutedSubQuery(1, f"first {q}?", (), "general"), RoutedSubQuery(2, f"second {q} #1?", (1,), "math"),
            RoutedSubQuery(3, f"third {q}?", (), "medicine")], AGGREGATOR,
            final=FinalAnswer.model if q % 2 else FinalAnswer.join)
    pool = FakePool({m: FaultyModel(EchoModel(m), FaultSettings(**settings)) for m in ("small", "big")})
    results, _, _ = run(policy, graph, pool, RetryPolicy(2, backoff_s=0.0))
    assert set(results) == set(graph.nodes)
    assert {r.status for r in results.values()} <= {"ok", "failed", "skipped"}
    assert all(r.error for r in results.values() if not r.ok)
    assert all(r.answer.strip() for r in results.values() if r.ok)  # never an empty answer passed off as ok
    for node in graph:
        if any(not results[p].ok for p in node.parents) and node.kind.value == "subquery":
            assert results[node.id].status == "skipped"
    assert sum(sum(m.injected.values()) for m in pool.models.values()) > 0
