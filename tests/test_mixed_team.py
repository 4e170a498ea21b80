"""A team on two models (conf/experts/mixed.yaml): experts naming one alias share one loaded copy, and the compiler
plans both models' residency and memory (both resident without a budget; swapped within a budget that holds one).
Composed with SmolLM2 under both aliases (two llama.cpp copies: other settings) so it runs in seconds."""
from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup-llamacpp`)")

from compiler.build import FinalAnswer, RoutedSubQuery, add_query  # noqa: E402
from compiler.ir import AGGREGATOR, Graph  # noqa: E402
from compiler.plan import StepKind  # noqa: E402


def test_mixed_team_composes_with_the_big_model_on_the_hard_domains(compose):
    cfg = compose("experts=mixed")
    assert {n: e.model for n, e in cfg.experts.items()} == {
        "law": "default", "medicine": "big", "economics": "default", "science_math": "big", "general": "default"}
    assert cfg.models.big.name == "Qwen2.5-Coder-1.5B-Instruct" and cfg.models.big.backend.name == "llamacpp"
    assert cfg.experts.medicine.system_prompt == compose().experts.medicine.system_prompt  # same roles, other model


@pytest.mark.model
def test_mixed_team_shares_copies_and_plans_both_models(compose, model_cache):
    from dataclasses import replace

    from compllm.apps.build import build_pipeline

    cfg = compose("experts=mixed", "model=smollm2-135m-llamacpp", "model@models.big=smollm2-135m-llamacpp",
                  "models.big.llamacpp.n_ctx=1024", "auto_calibrate=false", "show_progress=false",
                  f"cache_dir={model_cache}")
    pipe = build_pipeline(cfg)
    g = Graph()
    for i, expert in enumerate(["law", "medicine", "economics", "science_math"]):
        add_query(g, f"q{i}", f"Question {i}?", [RoutedSubQuery(1, f"In one word, question {i}?", (), expert,
                                                                max_new_tokens=4)], AGGREGATOR, final=FinalAnswer.join)
    pipe.prepare()
    plan = pipe.compile(g)
    assert set(plan.footprints) == {"default", "big"}
    on = {s.model: set(s.nodes) for s in plan.steps if s.kind is StepKind.GENERATE}
    assert on == {"default": {"q0:1", "q2:1"}, "big": {"q1:1", "q3:1"}}  # one call per model: experts share it
    assert plan.peak_planned_bytes >= plan.base_bytes + plan.footprints["default"] + plan.footprints["big"]
    results = pipe.policy.run(plan, pipe.context(), g)
    assert all(results[f"q{i}:1"].ok for i in range(4))
    assert {results[f"q{i}:1"].model for i in range(4)} == {"default", "big"}
    # experts on one alias share one loaded copy; two aliases with the same weights *and* settings would too
    assert pipe.pool._key("default") != pipe.pool._key("big")
    assert pipe.pool.resident("default") is not pipe.pool.resident("big")

    # a budget that holds one model at a time: the plan swaps them, within the budget
    one = max(plan.footprints.values())
    budget = plan.base_bytes + one + one // 2
    config = replace(pipe.compiler_config, memory_budget=budget, memory_headroom=0.0)
    for alias in ("default", "big"):  # plan from nothing resident: the plan's own loads and evictions
        pipe.pool.evict(alias)
    tight = pipe.compile_with(config, g)
    assert tight.peak_planned_bytes <= budget
    assert any(s.kind is StepKind.EVICT for s in tight.steps)
    assert {s.model for s in tight.steps if s.kind is StepKind.LOAD} == {"default", "big"}
    again = pipe.policy.run(tight, pipe.context(), g)
    assert all(again[f"q{i}:1"].answer == results[f"q{i}:1"].answer for i in range(4))
