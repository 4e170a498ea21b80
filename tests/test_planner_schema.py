"""The constrained planner without a model: the plan schema admits exactly the plans that are DAGs by construction,
the decomposer records how each output was decoded and read (the tolerant parser as the fallback), servers get the
schema as response_format, and numbered questions get their references as edges (a cycle is reported)."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import Graph
from compiler.verify import verify
from compllm.backends.base import Generation, GenerationRequest
from compllm.frontend.decomposer import Decomposer
from compllm.frontend.enumerated import numbered_references, split_enumerated
from compllm.frontend.parse import parse_decomposition
from compllm.frontend.plan_schema import MAX_SCHEMA_SUBQUERIES, plan_schema, plan_schema_text, schema_violation


def plan(*items):
    return [{"id": i, "question": q, "depends_on": list(d)} for i, (q, d) in enumerate(items, start=1)]


GOOD = plan(("Who wrote Romeo and Juliet?", ()), ("Where was #1 born?", (1,)), ("When did #1 and #2 meet?", (1, 2)))


def test_schema_admits_a_plan_whose_edges_point_back():
    assert schema_violation(GOOD, 8) == ""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(GOOD, plan_schema(8, 160))


@pytest.mark.parametrize("bad, why", [
    (plan(("a", (1,))), "depends on"),  # itself
    (plan(("a", ()), ("b", (3,)), ("c", ())), "depends on"),  # forward
    (plan(("a #2", ()), ("b", ())), "refers to a part"),  # forward reference in the text
    (plan(("a", ()), ("b #12", (1,))), "refers to a part"),  # #12 is not #1
    ([{"id": 2, "question": "a", "depends_on": []}], "has id"),
    ([{"id": 1, "question": "a", "depends_on": [], "x": 1}], "exactly"),
    ([], "list of 1..8"),
    ({"id": 1}, "list of 1..8"),
])
def test_schema_rejects_what_is_not_a_dag_by_construction(bad, why):
    assert why in schema_violation(bad, 8)
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, plan_schema(8, 160))


def test_schema_size_is_checked():
    with pytest.raises(ValueError, match="1..9 sub-queries"):
        plan_schema(MAX_SCHEMA_SUBQUERIES + 1, 160)
    with pytest.raises(ValueError, match="max_subqueries=12"):
        Decomposer("default", "Split.", max_subqueries=12, constrained=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.lists(st.integers(-2, 11), max_size=4)),
                min_size=1, max_size=8))
def test_a_plan_the_schema_admits_parses_to_the_same_dag(items):
    """Anything `plan_schema` admits is read by the parser as exactly its own edges (nothing dropped or repaired)."""
    value = plan(*items)
    if schema_violation(value, 8):
        return
    parsed = parse_decomposition(json.dumps(value), max_subqueries=8)
    assert [sq.index for sq in parsed.subqueries] == list(range(1, len(parsed.subqueries) + 1))
    for sq in parsed.subqueries:
        assert all(d < sq.index for d in sq.depends_on)


def gen(text: str, constrained: bool, finish: str = "stop") -> Generation:
    return Generation(text, 10, 10, 0.1, finish, constrained=constrained)


def test_decoding_is_recorded_for_each_path():
    free = Decomposer("default", "Split.")
    on = Decomposer("default", "Split.", constrained=True)
    assert free.request("q").json_schema == "" and json.loads(on.request("q").json_schema)["anyOf"]
    raw = json.dumps(GOOD)
    assert free.parse("q", raw, gen(raw, False)).decoding == "free"
    d = on.parse("q", raw, gen(raw, True))
    assert (d.decoding, d.fallback, len(d.subqueries), d.warnings) == ("constrained", False, 3, ())
    # asked for, not enforced: the tolerant parser read free text (a real backend that cannot enforce it, hf without
    # xgrammar: tests/test_planner_constrained_hf.py::test_without_xgrammar_hf_falls_back_to_free_decoding_and_says_so)
    d = on.parse("q", raw, gen(raw, False))
    assert d.decoding == "unenforced" and "cannot enforce" in d.warnings[0]
    cut = raw[: raw.index("}") + 12]  # enforced but cut at max_new_tokens: the tolerant parser recovers the complete parts
    d = on.parse("q", cut, gen(cut, True, "length"))
    assert d.decoding == "constrained-repaired" and not d.fallback and len(d.subqueries) == 1
    assert "cut at decomposer.max_new_tokens" in d.warnings[0]
    d = on.parse("q", "[{", gen("[{", True, "length"))  # nothing usable: the query unsplit, the path recorded
    assert d.fallback and d.decoding == "constrained-repaired" and d.reason


class _Server:
    json_schema = True
    model = "m"
    logprobs = False


def test_openai_backend_sends_the_schema_as_response_format_only_where_the_server_enforces_it():
    from compllm.backends.openai_server import OpenAIServerModel

    backend = object.__new__(OpenAIServerModel)  # no server: only the request body is under test
    backend.server = _Server()
    schema = plan_schema_text(3, 40)
    body = backend._kwargs(GenerationRequest(({"role": "user", "content": "q"},), 64, json_schema=schema))
    assert body["response_format"]["json_schema"]["schema"] == json.loads(schema)
    assert backend._constrains(GenerationRequest((), json_schema=schema))
    backend.server.json_schema = False
    assert "response_format" not in backend._kwargs(GenerationRequest((), json_schema=schema))


def test_fanoutqa_exemplars_are_gold_dags_in_dependency_order(compose):
    from hydra.utils import instantiate

    from compllm.data.fanoutqa import exemplars, fanoutqa_dev_path, load_fanoutqa_dev, without
    from compllm.models.errors import MissingPackageError

    try:
        fanoutqa_dev_path()
    except MissingPackageError as exc:
        pytest.skip(str(exc))

    cfg = compose("decomposer=fanoutqa")
    ids = list(cfg.decomposer.fanoutqa_exemplars)
    assert cfg.decomposer.constrained and len(ids) >= 3
    d = instantiate(cfg.decomposer, _convert_="all")
    assert len(d.examples) == len(cfg.decomposer.examples) + len(ids)
    for ex in exemplars(ids):
        items = plan(*[(s["question"], s["depends_on"]) for s in ex["subqueries"]])
        assert schema_violation(items, 9) == ""
        assert any(s["depends_on"] for s in ex["subqueries"])
    rest = without(load_fanoutqa_dev(), ids)
    assert len(rest) == len(load_fanoutqa_dev()) - len(ids) and not {i.id for i in rest} & set(ids)
    with pytest.raises(ValueError, match="not FanOutQA dev ids"):
        exemplars(["nope"])


# ----------------------------------------------------------------------------- numbered questions


def refs(query: str):
    return numbered_references(split_enumerated(query))


@pytest.mark.parametrize("query, deps", [
    ("1. Who wrote Romeo and Juliet? 2. In which country was that author born?", [(), (1,)]),
    ("1. Name a river in France. 2. What is 2+2? 3. How long is the river from question 1?", [(), (), (1,)]),
    ("1. Name a river in France. 2. What is 2+2? 3. Double #2.", [(), (), (2,)]),
    ("1. Who painted the Mona Lisa? 2. Where was he born? 3. What is the answer to question 1 backwards?",
     [(), (1,), (1,)]),
    ("1. What is 20% of 50? 2. What is the previous answer squared?", [(), (1,)]),
    ("1. Who founded Rome? 2. Is it true that cats purr? 3. Which organ makes insulin?", [(), (), ()]),
    ("1. What is the capital of Peru? 2. What is the capital of Chile?", [(), ()]),
])
def test_references_between_numbered_questions_become_edges(query, deps):
    assert refs(query) == (deps, [])


def test_a_cycle_between_numbered_questions_is_reported():
    deps, warnings = refs("1. Using the answer to question 2, name a river. 2. Which country borders the river in #1?")
    assert deps == [(), (1,)]  # parts run in the order the user numbered them
    assert len(warnings) == 1 and "cycle" in warnings[0] and "1 -> 2 -> 1" in warnings[0]


def test_a_forward_or_missing_reference_is_warned_not_an_edge():
    deps, warnings = refs("1. Use #3 to pick a city. 2. What is 1+1? 3. What is the answer to question 7?")
    assert deps == [(), (), ()]
    assert any("later question 3" in w for w in warnings) and any("question 7" in w for w in warnings)


def test_numbered_edges_reach_the_graph_and_every_part_is_in_the_final_answer():
    d = Decomposer("default", "Split.").enumerated(
        "1. Who wrote Romeo and Juliet? 2. In which country was that author born? "
        "3. Using question 3's answer and #2, what now?")
    assert [sq.depends_on for sq in d.subqueries] == [(), (1,), (2,)]
    cyc = Decomposer("default", "Split.").enumerated("1. Given the answer to question 2, who? 2. Given #1, what?")
    assert any("cycle" in w for w in cyc.warnings) and cyc.format == "enumerated"
    graph = Graph()
    routed = [RoutedSubQuery(sq.index, sq.text, sq.depends_on, "general") for sq in d.subqueries]
    q = add_query(graph, "q0", d.query, routed, "aggregator", 16, final=FinalAnswer.every)
    verify(graph, known_experts=["general", "aggregator"])
    assert graph.nodes["q0:2"].inputs == {"#1": "q0:1"}
    assert set(graph.nodes[q.sink].inputs.values()) == {"q0:1", "q0:2", "q0:3"}  # every part answered
    graph = Graph()
    q = add_query(graph, "q0", d.query, routed, "aggregator", 16, final=FinalAnswer.join)
    assert set(graph.nodes[q.sink].inputs.values()) == {"q0:3"}  # join: only what nothing else reads
