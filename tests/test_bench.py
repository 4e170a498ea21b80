"""Benchmark building blocks without models: item construction, enumerated splitting, the results store,
scoring, the no_deps rewrite, and the numbered-list final answer."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import AGGREGATOR, AnswerType, Graph, HostOp
from compllm.bench.meqa import meqa_all, meqa_p
from compllm.bench.scoring import bootstrap_ci, score, summarize
from compllm.bench.store import ResultsMismatchError, ResultsStore
from compllm.bench.systems import drop_dependencies
from compllm.data.mmlu import DOMAINS
from compllm.frontend.decomposer import Decomposition
from compllm.frontend.enumerated import split_enumerated
from compllm.frontend.parse import SubQuery
from compllm.runtime.host import run_host
from compllm.runtime.result import NodeResult


def test_meqa_p_is_fixed_prefix_stable_and_uses_distinct_domains():
    items = meqa_p(40)
    assert [i.to_dict() for i in items] == [i.to_dict() for i in meqa_p(40)]
    assert [i.id for i in meqa_p(10)] == [i.id for i in items[:10]]
    assert [i.query for i in meqa_p(10)] == [i.query for i in items[:10]]
    for item in items:
        domains = [p["domain"] for p in item.parts]
        assert 2 <= len(domains) <= 4 and len(set(domains)) == len(domains) and set(domains) <= set(DOMAINS)
        assert item.gold["letters"] == [p["answer"] for p in item.parts]
        assert split_enumerated(item.query)[:-1] == [p["question"] for p in item.parts][:-1]
    questions = [p["question"] for i in items for p in i.parts]
    assert len(set(questions)) == len(questions)  # no MMLU question is used twice


def test_meqa_p_rejects_impossible_settings():
    with pytest.raises(ValueError, match="k_max=5 exceeds the 4 distinct domains"):
        meqa_p(2, k_max=5)
    with pytest.raises(ValueError, match="only .* questions; lower n"):
        meqa_p(2000)


def _has_strategyqa() -> bool:
    from compllm.data.strategyqa import strategyqa_path
    from compllm.models.errors import MissingPackageError

    try:
        strategyqa_path()
    except MissingPackageError:
        return False
    return True


@pytest.mark.skipif(not _has_strategyqa(), reason="StrategyQA is not installed (`make setup-strategyqa`; "
                                                   "`make test` installs it)")
def test_meqa_all_interleaves_kinds():
    items = meqa_all(n_meqa_p=3, n_fanoutqa=3, n_strategyqa=3)
    assert [i.kind for i in items[:3]] == ["meqa", "fanoutqa", "strategyqa"]
    assert all(len(i.parts) <= 6 for i in items if i.kind == "fanoutqa")
    assert all(i.query.endswith("Answer yes or no.") for i in items if i.kind == "strategyqa")


@pytest.mark.parametrize("query, parts", [
    ("Please answer. Question 1: Is it? Options: (A) x (B) y. Question 2: Why not? Reply with one line per question.",
     ["Is it? Options: (A) x (B) y.", "Why not?"]),
    ("1) What is 2+2? 2) Who wrote Hamlet? 3) Why?", ["What is 2+2?", "Who wrote Hamlet?", "Why?"]),
    ("Help me.\n1. First thing?\n2. Second thing?", ["First thing?", "Second thing?"]),
    ("What is 2+2? And who wrote Hamlet?", None),
    ("Compare options 1. and 2. carefully", None),
    ("In 1984. Orwell wrote 2. things", None),
    ("Question 1: only one question here?", None),
    ("Question 2: starts at two? Question 3: then three?", None),
])
def test_split_enumerated(query, parts):
    assert split_enumerated(query) == parts


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_split_enumerated_never_crashes_and_keeps_text(text):
    parts = split_enumerated(text)
    if parts is not None:
        assert len(parts) >= 2 and all(p and p in text for p in parts)


def test_enumerated_queries_skip_the_model_and_respect_caps(compose):
    from hydra.utils import instantiate

    decomposer = instantiate(compose().decomposer, _convert_="all", max_subqueries=2)

    def no_model(requests):
        raise AssertionError("an enumerated query needs no model call")

    (d,) = decomposer.decompose(no_model, ["Question 1: A? Question 2: B? Question 3: C?"])
    assert d.format == "enumerated" and not d.fallback
    assert [s.text for s in d.subqueries] == ["A?", "B?"]
    assert d.omitted == "question 3 of 3 was not answered: at most 2 are (decomposer.max_subqueries)"
    assert d.warnings == (d.omitted,)


def test_store_resumes_cuts_a_torn_line_and_refuses_other_configs(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultsStore(path, {"system": "a"})
    store.append({"id": "x", "v": 1})
    with pytest.raises(ValueError, match="already in"):
        store.append({"id": "x", "v": 2})
    with path.open("a") as f:
        f.write('{"id": "y", "v"')  # the process died mid-write
    again = ResultsStore(path, {"system": "a"})
    assert list(again.records) == ["x"] and path.read_text().endswith("\n")
    again.append({"id": "y", "v": 3})
    assert [json.loads(line).get("id") for line in path.read_text().splitlines()] == [None, "x", "y"]
    with pytest.raises(ResultsMismatchError, match="differs in: system"):
        ResultsStore(path, {"system": "b"})


def _meqa_record(final, subs=None):
    parts = [{"domain": "law", "question": "q1", "answer": "A"}, {"domain": "medicine", "question": "q2", "answer": "C"}]
    return {"id": "i", "kind": "meqa", "gold": {"letters": ["A", "C"]}, "parts": parts,
            "answer": {"final_answer": final, "subqueries": subs or [], "latency_s": 1.0, "partial": False}}


def test_meqa_scoring_and_stage_attribution():
    subs = [{"expert": "law", "answer": "The answer is (A)."}, {"expert": "general", "answer": "B"}]
    s = score(_meqa_record("Question 1: A\nQuestion 2: B", subs))
    assert s["part_correct"] == [True, False] and s["part_accuracy"] == 0.5 and not s["all_correct"]
    assert s["stage"] == ["correct", "expert_wrong_misrouted"] and s["routed_to_domain"] == [True, False]
    lost = score(_meqa_record("Question 1: D\nQuestion 2: C", subs[:1] + [{"expert": "medicine", "answer": "C"}]))
    assert lost["stage"] == ["aggregation", "correct"]
    assert score(_meqa_record("A", subs[:1]))["stage"] == ["split", "split"]


def test_summary_has_confidence_intervals():
    records = [_meqa_record("1: A 2: C"), _meqa_record("1: B 2: B")]
    s = summarize(records)["meqa"]
    assert s["n"] == 2 and s["part_accuracy"] == 0.5 and s["all_correct"] == 0.5
    lo, hi = s["part_accuracy_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)


def test_no_deps_inlines_referenced_questions():
    d = Decomposition("q", (SubQuery(1, "Who wrote Hamlet?", ()), SubQuery(2, "When was #1 born?", (1,))), False)
    out = drop_dependencies(d)
    assert [s.depends_on for s in out.subqueries] == [(), ()]
    assert out.subqueries[1].text == "When was [Who wrote Hamlet?] born?"


def test_joined_aggregate_answers_numbered_lines_without_a_model():
    graph = Graph()
    subs = [RoutedSubQuery(1, "A?", (), "law"), RoutedSubQuery(2, "B?", (), "medicine")]
    add_query(graph, "q0", "Question 1: A? Question 2: B?", subs, AGGREGATOR, 64, final=FinalAnswer.join)
    sink = graph.nodes["q0:agg"]
    assert sink.host is HostOp.JOIN and sink.est_output_tokens == 0
    results = {"q0:1": NodeResult("q0:1", "q0", "subquery", "law", "m", answer="B\n(the rule)", status="ok"),
               "q0:2": NodeResult("q0:2", "q0", "subquery", "medicine", "m", status="failed", error="boom")}
    assert run_host(sink, results) == ("1. B (the rule)\n2. (not answered: boom)", "")
    results["q0:1"].status = "skipped"
    assert run_host(sink, results)[1] == "no part was answered (part 1: skipped; part 2: boom)"


@pytest.mark.parametrize("text, letters", [
    ("Which? Options: (A) x (B) y (C) z (D) w.", ("A", "B", "C", "D")),
    ("Pick (A) one or (B) two", ("A", "B")),
    ("Vitamin (C) only", ()),
    ("(B) then (A)", ()),
    ("no options", ()),
])
def test_option_letters(text, letters):
    from compiler.choices import option_letters

    assert option_letters(text) == letters


def test_numbered_multiple_choice_parts_become_choice_nodes(compose):
    from hydra.utils import instantiate

    from compllm.experts import Expert
    from compllm.runtime.prompts import subquery_request

    decomposer = instantiate(compose().decomposer, _convert_="all")
    (d,) = decomposer.decompose(None, ["Question 1: Which? Options: (A) x (B) y. Question 2: Why is the sky blue?"])
    assert [s.answer_type for s in d.subqueries] == ["choice", "text"]
    graph = Graph()
    subs = [RoutedSubQuery(s.index, s.text, (), "general", s.answer_type, max_new_tokens=1 if s.answer_type == "choice" else 50)
            for s in d.subqueries]
    add_query(graph, "q0", d.query, subs, AGGREGATOR, 64)
    expert = Expert("general", "d", "default", "sys", (), 50)
    choice, text = (subquery_request(graph.nodes[f"q0:{i}"], expert, {}) for i in (1, 2))
    assert choice.choices == ("A", "B") and choice.max_new_tokens == 1
    assert text.choices == () and text.max_new_tokens == 50
    untyped = instantiate(compose("decomposer.detect_choices=false").decomposer, _convert_="all")
    assert {s.answer_type for s in untyped.decompose(None, [d.query])[0].subqueries} == {"text"}


def test_fanoutqa_items_leave_out_the_excluded_ids():
    from compllm.bench.meqa import fanoutqa_items

    first = fanoutqa_items(3)
    shown = first[0].id.removeprefix("fanoutqa-")
    again = fanoutqa_items(3, exclude=[shown])
    assert first[0].id not in {i.id for i in again} and again[:2] == first[1:]


@pytest.mark.skipif(not _has_strategyqa(), reason="StrategyQA is not installed (`make setup-strategyqa`; "
                                                   "`make test` installs it)")
def test_a_benchmark_never_scores_the_planners_exemplars(compose):
    """An exemplar the planner is shown worked out is left out of every evaluation, whatever the loader."""
    from compllm.bench.runner import load_items

    plain = load_items(compose("task=bench", "benchmark=meqa_all"), limit=6)
    shown = plain[1].id.removeprefix("fanoutqa-")
    assert plain[1].kind == "fanoutqa"
    cfg = compose("task=bench", "benchmark=meqa_all", "decomposer=fanoutqa",
                  f"decomposer.fanoutqa_exemplars=[{shown}]")
    ids = [i.id for i in load_items(cfg, limit=6)]
    assert plain[1].id not in ids and len(ids) == 6
