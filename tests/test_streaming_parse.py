"""The planner read while it writes: parts handed out once complete, never renumbered, consistent at the end."""
import json

import pytest

from compllm.frontend.decomposer import Decomposer
from compllm.frontend.streaming import StreamingReader

PLANNER = Decomposer("default", "Split the question.", max_subqueries=8)


def stream(raw: str, step: int = 3) -> tuple[list, list, object]:
    """Feed `raw` in `step`-character chunks, as tokens would arrive; (parts as handed out, at which prefix, final)."""
    seen, at = [], []
    reader = StreamingReader(PLANNER, "q?", lambda sq: (seen.append(sq), at.append(None)))
    for end in range(step, len(raw) + step, step):
        before = len(seen)
        reader.feed(raw[:end])
        at[before:] = [end] * (len(seen) - before)
    return seen, at, reader.finish(raw, None)


JSON_PLAN = json.dumps([{"id": 1, "question": "Who wrote Romeo and Juliet?", "depends_on": []},
                        {"id": 2, "question": "Where was #1 born?", "depends_on": [1]},
                        {"id": 3, "question": "What is 15% of 240?", "depends_on": []}])


def test_json_parts_are_handed_out_as_soon_as_their_object_closes():
    seen, at, final = stream(JSON_PLAN)
    assert [(s.index, s.text, s.depends_on) for s in seen] == [
        (1, "Who wrote Romeo and Juliet?", ()), (2, "Where was #1 born?", (1,)), (3, "What is 15% of 240?", ())]
    first_close = JSON_PLAN.index("}") + 1
    assert at[0] <= first_close + 3 and at[1] < len(JSON_PLAN)  # part 1 before the output was complete
    assert final.subqueries == tuple(seen) and not final.fallback


def test_numbered_lines_are_handed_out_line_by_line_and_the_last_at_the_end():
    raw = "1. Who wrote Hamlet?\n2. When was #1 born?\n3. What is 2+2?"
    seen, at, final = stream(raw)
    assert [s.text for s in seen] == ["Who wrote Hamlet?", "When was #1 born?"]  # line 3 has no newline yet
    assert [s.text for s in final.subqueries] == ["Who wrote Hamlet?", "When was #1 born?", "What is 2+2?"]
    assert final.subqueries[1].depends_on == (1,)


def test_a_part_reading_a_later_part_waits_and_nothing_started_is_renumbered():
    raw = json.dumps([{"id": 1, "question": "A #2?", "depends_on": [2]}, {"id": 2, "question": "B?"}])
    seen, _, final = stream(raw)
    assert all(sq.index == i + 1 for i, sq in enumerate(seen))
    assert [s.text for s in final.subqueries][: len(seen)] == [s.text for s in seen]


@pytest.mark.parametrize("raw", ["", "I cannot help.", "[{", '[{"question": "only half'])
def test_unusable_output_hands_out_nothing_and_falls_back(raw):
    seen, _, final = stream(raw)
    assert not seen and final.fallback and final.subqueries[0].text == "q?"
