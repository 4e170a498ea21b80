"""A closed-form instruction ("Answer yes or no.") survives the planner's split: a last part asks the query
itself, reading the parts nothing else reads, so the final answer is in the asked form."""
import json

import pytest

from compllm.backends.base import Generation
from compllm.frontend.answer_format import closed_form_instruction
from compllm.frontend.decomposer import Decomposer
from compllm.frontend.streaming import StreamingReader
from compllm.runtime.faults import CallOutcome

QUERY = "Could a Viking ship cross the Atlantic faster than a Roman galley? Answer yes or no."
PLAN = json.dumps([{"id": 1, "question": "How fast did Viking ships sail?", "depends_on": []},
                   {"id": 2, "question": "How fast did Roman galleys row?", "depends_on": []},
                   {"id": 3, "question": "Is #1 faster than #2?", "depends_on": [1, 2]},
                   {"id": 4, "question": "How wide is the Atlantic?", "depends_on": []}])


@pytest.mark.parametrize("query, instruction", [
    (QUERY, "Answer yes or no."),
    ("Is it raining? Please answer with yes or no", "Please answer with yes or no"),
    ('Was Lincoln tall? Reply "yes" or "no" only.', 'Reply "yes" or "no" only.'),
    ("Water boils at 100 C at sea level. Answer true or false.", "Answer true or false."),
    ("Is Mars red? Answer yes/no.", "Answer yes/no."),
    ("Who wrote Hamlet? Answer briefly.", ""),
    ("Is the answer yes or no?", ""),
    ("Answer yes or no: is the sky blue?", ""),  # not closing the query: the parts keep it in their text
])
def test_closing_instruction_is_found_only_when_it_asks_a_closed_form(query, instruction):
    assert closed_form_instruction(query) == instruction


def planner(raw: str, **kw) -> tuple[Decomposer, list]:
    d = Decomposer("default", "Split the question.", **kw)
    calls = []

    def call(requests):
        calls.append(requests)
        return [CallOutcome(Generation(raw, 10, 10, 0.1), "", 1) for _ in requests]

    return d, d.decompose(call, [QUERY])


def test_a_last_part_asks_the_query_after_the_parts_nothing_reads():
    _, (d,) = planner(PLAN)
    *parts, last = d.subqueries
    assert [p.text for p in parts] == [json.loads(PLAN)[i]["question"] for i in range(4)]
    assert (last.index, last.text, last.depends_on) == (5, QUERY, (3, 4))
    assert d.closed_form == "Answer yes or no." and not d.fallback


def test_nothing_is_added_when_a_final_part_kept_the_form_or_the_query_fell_back():
    kept = json.dumps([{"id": 1, "question": "How fast were Viking ships?", "depends_on": []},
                       {"id": 2, "question": "So, could they beat a galley? Answer yes or no.", "depends_on": [1]}])
    _, (d,) = planner(kept)
    assert len(d.subqueries) == 2 and d.closed_form == ""
    _, (fb,) = planner("I cannot split this.")
    assert fb.fallback and [s.text for s in fb.subqueries] == [QUERY] and fb.closed_form == ""


def test_at_the_part_cap_the_form_is_not_kept_and_a_warning_says_so():
    _, (d,) = planner(PLAN, max_subqueries=4)
    assert len(d.subqueries) == 4 and d.closed_form == ""
    assert any("Answer yes or no." in w and "max_subqueries" in w for w in d.warnings)


def test_streamed_parts_run_first_and_the_closed_form_part_comes_last():
    d = Decomposer("default", "Split the question.")
    seen = []
    reader = StreamingReader(d, QUERY, seen.append)
    for end in range(4, len(PLAN) + 4, 4):
        reader.feed(PLAN[:end])
    final = reader.finish(PLAN, None)
    assert [s.index for s in seen] == [1, 2, 3, 4]
    assert tuple(final.subqueries[:4]) == tuple(seen) and final.subqueries[4].text == QUERY
    assert final.subqueries[4].depends_on == (3, 4)
