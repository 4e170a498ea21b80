"""The cascade on a real model: SmolLM2-135M under two aliases (two llama.cpp copies of one GGUF), the compiler's
plan executed both ways. Checks that the guard is the only thing that decides: escalated iff the draft's reported
confidence is below the threshold, an escalated part carries the big alias's answer to the same prompt, a kept
one the draft's; and that the backend reports confidences (choice margin, text exp mean log-prob)."""
from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup-llamacpp`)")

from compiler.build import FinalAnswer, RoutedSubQuery, add_query  # noqa: E402
from compiler.config import CascadeConfig  # noqa: E402
from compiler.ir import AGGREGATOR, Graph  # noqa: E402
from compiler.plan import StepKind  # noqa: E402

QUESTIONS = [
    ("law", "choice", "Which court hears appeals from US federal district courts? Options: (A) The county court "
                      "(B) The circuit courts of appeals (C) The tax court (D) The small claims court. Answer with the "
                      "letter of the correct option."),
    ("medicine", "choice", "Which vitamin deficiency causes scurvy? Options: (A) Vitamin A (B) Vitamin B12 "
                           "(C) Vitamin C (D) Vitamin D. Answer with the letter of the correct option."),
    ("economics", "choice", "What happens to bond prices when interest rates rise? Options: (A) They rise "
                            "(B) They fall (C) They stay the same (D) They double. Answer with the letter of the "
                            "correct option."),
    ("general", "text", "What is the capital of France?"),
]


def parts_graph() -> Graph:
    g = Graph()
    for i, (expert, kind, text) in enumerate(QUESTIONS):
        add_query(g, f"p{i}", text, [RoutedSubQuery(1, text, (), expert, kind, max_new_tokens=8)], AGGREGATOR,
                  final=FinalAnswer.join)
    return g


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import os

    from hydra import compose, initialize_config_dir

    from compllm.apps.build import build_pipeline
    from compllm.config.schema import register
    from tests.conftest import CONF_DIR

    cache = os.environ.get("COMPLLM_CACHE") or str(tmp_path_factory.mktemp("cache"))
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=smollm2-135m-llamacpp", "+model@models.big=smollm2-135m-llamacpp",
            "models.big.llamacpp.n_ctx=1024",  # other llama.cpp settings: a second loaded copy, a second model
            "policy=cascade", "auto_calibrate=false", "show_progress=false", f"cache_dir={cache}"])
    return build_pipeline(cfg)


def run(pipe, threshold: float):
    from dataclasses import replace

    pipe.compiler_config = replace(pipe.compiler_config, cascade=CascadeConfig("big", threshold, None, []))
    g = parts_graph()
    plan = pipe.compile(g)
    return plan, pipe.policy.run(plan, pipe.context(), g)


@pytest.mark.model
def test_smollm2_cascade_both_ways(pipe):
    plan, always = run(pipe, 1.01)  # above any confidence: every part escalates
    # both models are in the plan: loaded by a step, or resident from the start (the cost model loaded them)
    assert {s.model for s in plan.steps if s.kind is StepKind.LOAD} | set(plan.initial) == {"default", "big"}
    assert {s.model for s in plan.steps if s.kind is StepKind.GENERATE} == {"default", "big"}
    assert pipe.pool.resident("default") is not pipe.pool.resident("big")  # two aliases, two loaded copies
    ids = [f"p{i}:1" for i in range(len(QUESTIONS))]
    drafts = {nid: always[nid + "~draft"] for nid in ids}
    for nid in ids:
        draft, esc = drafts[nid], always[nid]
        assert draft.ok and draft.model == "default" and 0.0 <= draft.confidence <= 1.0
        assert esc.escalated is True and esc.model == "big" and esc.prompt == draft.prompt  # the same question
    for nid in ids[:3]:
        assert always[nid].answer in "ABCD" and len(always[nid].answer) == 1

    _, never = run(pipe, 0.0)  # no confidence is below 0: nothing escalates, every answer is the draft's
    for nid in ids:
        assert never[nid].escalated is False and never[nid].answer == never[nid + "~draft"].answer
        assert never[nid].answer == drafts[nid].answer  # greedy and deterministic: the same draft again
        assert never[nid].note.startswith("not escalated: draft confidence")

    confidences = sorted(d.confidence for d in drafts.values())
    threshold = (confidences[1] + confidences[2]) / 2  # two parts below, two above
    _, mixed = run(pipe, threshold)
    for nid in ids:
        expect = drafts[nid].confidence < threshold
        assert mixed[nid].escalated is expect
        assert mixed[nid].answer == (always[nid].answer if expect else drafts[nid].answer)
    assert sum(mixed[nid].escalated for nid in ids) == 2


@pytest.mark.model
def test_hf_and_llamacpp_report_the_same_kind_of_confidence(compose, model_cache):
    """Both in-process engines score a choice by its option letters' first-token margin and text by exp(mean token
    log-prob): on one GGUF (hf dequantized, llama.cpp as is) they agree closely."""
    from omegaconf import OmegaConf

    from compllm.backends.base import GenerationRequest
    from compllm.backends.pool import ModelPool

    cfg = compose("model=smollm2-135m", f"cache_dir={model_cache}", "+model@models.fast=smollm2-135m-llamacpp")
    pool = ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True), cache_dir=model_cache)
    choice = GenerationRequest(({"role": "user", "content": QUESTIONS[1][2]},), 1, (), ("A", "B", "C", "D"))
    # a question both engines answer with the same words (on others the Q4_1 engine writes another answer)
    text = GenerationRequest(({"role": "user", "content": "What is 2+2?"},), 8)
    hf, cpp = (pool.get(alias).generate([choice, text]) for alias in ("default", "fast"))
    for g in (hf, cpp):
        assert len(g[0].choice_probs) == 4 and sum(g[0].choice_probs) == pytest.approx(1.0)
        ranked = sorted(g[0].choice_probs, reverse=True)
        assert g[0].confidence == pytest.approx(ranked[0] - ranked[1])
        assert 0.0 < g[1].confidence <= 1.0
    assert hf[0].text == cpp[0].text
    assert hf[0].confidence == pytest.approx(cpp[0].confidence, abs=0.1)
    assert hf[1].text == cpp[1].text
    assert hf[1].confidence == pytest.approx(cpp[1].confidence, abs=0.05)
