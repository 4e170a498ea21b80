"""The cascade as a compiler feature: the `cascade` pass plans a guarded escalate node per part (both models'
residency and memory in the plan, time at the expected escalation rate), and the executor only evaluates the
guard. Both ways (escalated / not) on deterministic fakes here; on SmolLM2 with two aliases in
tests/test_cascade_model.py."""
from __future__ import annotations

import pytest

from compiler import CompilerConfig, CostModel, ModelCost, compile
from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.config import CascadeConfig
from compiler.errors import ConfigError
from compiler.ir import AGGREGATOR, Graph, Guard, NodeKind
from compiler.plan import Plan, StepKind
from compiler.verify import GuardError, verify
from compllm.backends.base import (BackendError, Generation, ModelStats, choice_confidence, text_confidence)
from compllm.experts import Expert
from compllm.runtime.context import ExecutionContext
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.prompts import Aggregator
from tests.fakes import FakePool


class SureModel:
    """Deterministic fake: answers `<name>:<question>`; confident (0.9) when the question says "easy", unsure
    (0.1) otherwise; fails on "broken" when `fail_broken`. Records the questions it was asked."""

    def __init__(self, name: str, fail_broken: bool = False):
        self.name, self.stats, self.fail_broken = name, ModelStats(), fail_broken
        self.asked: list[str] = []

    def generate(self, requests, max_live_rows=None, cancel=None, on_text=None):
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            self.asked.append(user)
            if self.fail_broken and "broken" in user:
                raise BackendError(f"{self.name} refuses")
            out.append(Generation(f"{self.name}:{user[:12]}", 10, 1, 0.0, "stop", len(requests),
                                  confidence=0.9 if "easy" in user else 0.1))
        return out


EXPERTS = {"general": Expert("general", "d", "small", "sys"), "math": Expert("math", "d", "small", "sys")}
MC = ModelCost(weight_bytes=1000, kv_bytes_per_token=1, prefill_s_per_token=0.001, decode_s_per_token=0.01)
BIG = ModelCost(weight_bytes=3000, kv_bytes_per_token=3, prefill_s_per_token=0.003, decode_s_per_token=0.03)


def cost() -> CostModel:
    return CostModel({"small": MC, "big": BIG}, {"general": "small", "math": "small", AGGREGATOR: "small"})


def graph() -> Graph:
    g = Graph()
    add_query(g, "q0", "easy one, hard one", [
        RoutedSubQuery(1, "An easy question?", (), "general", "choice"),
        RoutedSubQuery(2, "A hard question?", (), "math", "choice"),
        RoutedSubQuery(3, "Using #2, a hard follow-up?", (2,), "general", max_new_tokens=8),
    ], AGGREGATOR, final=FinalAnswer.join)
    return g


def config(threshold: float = 0.5, **kw) -> CompilerConfig:
    return CompilerConfig(cascade=CascadeConfig(to_model="big", threshold=threshold, **kw))


def execute(plan: Plan, g: Graph, pool):
    ctx = ExecutionContext(pool, EXPERTS, Aggregator("small", "Combine."))
    return PlanExecutor("cascade").run(plan, ctx, g)


def test_the_pass_plans_a_guarded_escalate_node_per_part():
    g = graph()
    plan = compile(g, cost(), config(0.5, expected_rate=0.25))
    cg = plan.graph
    for part in ("q0:1", "q0:2", "q0:3"):
        esc, draft = cg.nodes[part], cg.nodes[part + "~draft"]
        assert esc.kind is NodeKind.ESCALATE and esc.model == "big" and esc.expert == draft.expert
        assert esc.guard == Guard(draft.id, 0.5, 0.25) and draft.id in esc.parents
        assert draft.kind is NodeKind.SUBQUERY and draft.model == "" and esc.template == draft.template
    # consumers keep reading the part's id: the follow-up's draft and the sink read the escalate node
    assert cg.nodes["q0:3~draft"].inputs == {"#2": "q0:2"}
    assert set(cg.nodes["q0:agg"].parents) == {"q0:1", "q0:3"}
    # both models planned: the big model's load and calls are steps whatever the drafts will say
    gens = {s.model for s in plan.steps if s.kind is StepKind.GENERATE}
    assert gens == {"small", "big"} and {s.model for s in plan.steps if s.kind is StepKind.LOAD} == {"small", "big"}
    assert "guard(confidence(q0:1~draft) < 0.5, expected 0.25)" in cg.dump()
    # JSON round trip keeps the guard and the model
    again = Plan.from_json(plan.to_json())
    assert again.graph.nodes["q0:2"].guard == cg.nodes["q0:2"].guard and again.graph.nodes["q0:2"].model == "big"


def test_time_is_planned_at_the_expected_rate_memory_for_every_escalation():
    g = graph()
    est = {r: sum(s.est_s for s in compile(g, cost(), config(0.5, expected_rate=r)).steps
                  if s.kind is StepKind.GENERATE and s.model == "big") for r in (0.2, 1.0)}
    assert est[0.2] == pytest.approx(0.2 * est[1.0])
    low, high = (compile(g, cost(), config(0.5, expected_rate=r)) for r in (0.0, 1.0))
    assert low.peak_planned_bytes == high.peak_planned_bytes
    assert [s.bytes for s in low.steps] == [s.bytes for s in high.steps]


def test_a_budget_for_one_model_at_a_time_makes_the_plan_swap_them():
    g = graph()
    budget = 3000 + 400  # the big model and one call: never both models at once
    plan = compile(g, cost(), CompilerConfig(memory_budget=budget, cascade=CascadeConfig("big", 0.5)))
    assert plan.peak_planned_bytes <= budget
    assert any(s.kind is StepKind.EVICT and s.model == "small" for s in plan.steps)
    plan.verify(cost())


def test_without_a_cascade_the_pass_changes_nothing():
    g = graph()
    plan = compile(g, cost(), CompilerConfig())
    assert set(plan.graph.nodes) == set(g.nodes) and all(n.guard is None for n in plan.graph)


def test_both_ways_escalated_and_not():
    g = graph()
    small, big = SureModel("small"), SureModel("big")
    results = execute(compile(g, cost(), config(0.5)), g, FakePool({"small": small, "big": big}))
    easy, hard, follow = results["q0:1"], results["q0:2"], results["q0:3"]
    assert easy.escalated is False and easy.answer == "small:An easy ques" and easy.model == "small"
    assert easy.note.startswith("not escalated: draft confidence 0.900 >= 0.5") and easy.prompt_tokens == 0
    assert hard.escalated is True and hard.answer == "big:A hard quest" and hard.model == "big"
    assert hard.note == "escalated: draft confidence 0.100 < 0.5"
    assert follow.escalated is True and follow.answer.startswith("big:")
    # the follow-up (draft and escalation) read the *escalated* answer of part 2
    assert any("big:A hard quest" in q for q in big.asked if "follow-up" in q)
    assert results["q0:1~draft"].confidence == 0.9
    assert len(big.asked) == 2  # only the unsure parts reached the big model
    assert results["q0:agg"].ok and "small:An easy ques" in results["q0:agg"].answer


def test_threshold_zero_never_escalates_but_the_big_model_is_still_planned():
    g = graph()
    small, big = SureModel("small"), SureModel("big")
    pool = FakePool({"small": small, "big": big})
    plan = compile(g, cost(), config(0.0))
    results = execute(plan, g, pool)
    assert not big.asked and all(results[p].escalated is False for p in ("q0:1", "q0:2", "q0:3"))
    assert "big" in pool.loads  # the plan's load step ran: residency is the compiler's, not the drafts'


def test_a_failed_draft_escalates():
    g = Graph()
    add_query(g, "q0", "x", [RoutedSubQuery(1, "easy but broken?", (), "general", "choice")], AGGREGATOR,
              final=FinalAnswer.join)
    small, big = SureModel("small", fail_broken=True), SureModel("big")
    results = execute(compile(g, cost(), config(0.5)), g, FakePool({"small": small, "big": big}))
    assert results["q0:1~draft"].status == "failed"
    assert results["q0:1"].escalated is True and results["q0:1"].answer.startswith("big:")
    assert results["q0:1"].note.startswith("escalated: draft failed")


def test_only_named_experts_cascade_and_unknown_targets_are_refused():
    g = graph()
    plan = compile(g, cost(), config(0.5, experts=["math"]))
    assert plan.graph.nodes["q0:2"].kind is NodeKind.ESCALATE
    assert plan.graph.nodes["q0:1"].kind is NodeKind.SUBQUERY and "q0:1~draft" not in plan.graph.nodes
    with pytest.raises(ConfigError, match="to_model 'huge'"):
        compile(g, cost(), CompilerConfig(cascade=CascadeConfig("huge", 0.5)))
    with pytest.raises(ConfigError, match="threshold must be >= 0"):
        compile(g, cost(), config(-0.5))


def test_the_verifier_refuses_a_guard_on_a_non_parent():
    plan = compile(graph(), cost(), config(0.5))
    g = plan.graph.copy()
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(guard=Guard("q0:2~draft", 0.5))
    with pytest.raises(GuardError, match="not one of its parents"):
        verify(g)
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(guard=None)
    with pytest.raises(GuardError, match="needs a guard"):
        verify(g)


def test_confidence_scores():
    margin, probs = choice_confidence([2.0, 2.0, -10.0, -10.0])
    assert margin == pytest.approx(0.0, abs=1e-6) and sum(probs) == pytest.approx(1.0)
    margin, probs = choice_confidence([10.0, 0.0, 0.0, 0.0])
    assert margin > 0.99 and probs[0] == max(probs)
    assert text_confidence([]) is None
    assert text_confidence([-0.1, -0.1]) == pytest.approx(0.9048, abs=1e-4)


def test_policy_config_reaches_the_compiler_and_a_missing_big_model_is_one_line(compose):
    from compllm.config.checks import check_config

    cfg = compose("policy=cascade")
    with pytest.raises(ConfigError, match=r"policy.cascade.to_model='big' names no configured model; add the big"):
        check_config(cfg)
    cfg = compose("policy=cascade", "+model@models.big=smollm2-135m-llamacpp", "model=smollm2-135m",
                  "policy.cascade.threshold=0.3")
    check_config(cfg)
    from compllm.apps.build import build_pipeline

    pipe = build_pipeline(cfg)
    assert pipe.compiler_config.cascade == CascadeConfig("big", 0.3, 0.96, [])
    assert pipe.policy.name == "cascade" and "big" in pipe.model_aliases()
    with pytest.raises(ConfigError, match=r"policy.cascade.threshold=-0.1 must be >= 0"):
        check_config(compose("policy=cascade", "+model@models.big=smollm2-135m", "policy.cascade.threshold=-0.1"))


def test_explain_lists_the_escalations():
    from compiler.explain import explain_text

    g = graph()
    text = explain_text(g, compile(g, cost(), config(0.3, expected_rate=0.2)))
    assert "== cascade (3 escalate nodes" in text
    assert "  q0:2 on big: if confidence(q0:2~draft) < 0.3 (expected rate 0.2)" in text
    assert "== cascade" not in explain_text(g, compile(g, cost(), CompilerConfig()))
