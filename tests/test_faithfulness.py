"""Faithfulness metrics (compllm/data/faithfulness.py) on hand-made final answers, and the compound-question set."""
import json
from pathlib import Path

import pytest

from compllm.data.faithfulness import (SUPPORT_THRESHOLD, CompoundQuestion, GoldPart, SubAnswer, aggregate,
                                       contains_gold, key_tokens, load_questions, missing_stated, must_carry,
                                       part_correct, part_reaches_final, score_query, split_sentences,
                                       unsupported_sentences, verbatim_in)

ROOT = Path(__file__).resolve().parents[1]
SET = ROOT / "experiments" / "data" / "compound_questions.jsonl"

QUERY = "Which vitamin prevents scurvy, and what is 15% of 240?"
SUBS = [SubAnswer(1, "Which vitamin prevents scurvy?", "Scurvy is prevented by vitamin D."),
        SubAnswer(2, "What is 15% of 240?", "15% of 240 is 36.")]
GOLD = CompoundQuestion("t", QUERY, (GoldPart("Which vitamin prevents scurvy?", ("vitamin C",)),
                                     GoldPart("What is 15% of 240?", ("36",))), "independent")
CHAIN = [SubAnswer(1, "Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
         SubAnswer(2, "In which country was #1 born?", "William Shakespeare was born in England.", (1,))]
CHAIN_QUERY = "Who wrote Romeo and Juliet, and in which country was that author born?"


def test_split_sentences_drops_markers_and_keeps_initials():
    text = "1. George H. W. Bush was president in 1989.\n2. Scurvy: vitamin C. 15% of 240 is 36.\nPart 3: Dr. No!"
    assert split_sentences(text) == ["George H. W. Bush was president in 1989.", "Scurvy: vitamin C.",
                                     "15% of 240 is 36.", "Dr. No!"]
    assert split_sentences("1. Paris. 2. 24 hours.") == ["Paris.", "24 hours."]
    assert split_sentences("1. 36.\n2. 27") == ["36.", "27"]  # a number answer is not a list marker
    assert split_sentences("Vitamin C. It is 36.") == ["Vitamin C.", "It is 36."]
    dc = "Washington, D.C. is the capital of the U.S."
    assert split_sentences(dc) == [dc]
    assert split_sentences("法国的首都是巴黎。一年有十二个月。") == ["法国的首都是巴黎。", "一年有十二个月。"]
    assert split_sentences("  \n- \n") == []
    assert split_sentences("Fact 1: Paris.\nAnswer: 36.\nPart-time work pays.") == ["Paris.", "36.",
                                                                                   "Part-time work pays."]


def test_must_carry_is_the_answered_leaves():
    assert [s.index for s in must_carry(CHAIN)] == [2]
    assert [s.index for s in must_carry(SUBS)] == [1, 2]
    failed = [SUBS[0], SubAnswer(2, "What is 15% of 240?", "", ok=False)]
    assert [s.index for s in must_carry(failed)] == [1]  # nothing to carry from a part that has no answer


def test_verbatim_ignores_only_case_and_whitespace():
    final = "1. scurvy is prevented by\n   VITAMIN D.\n2. 15% of 240 is 36."
    assert verbatim_in(SUBS[0].answer, final)
    assert not verbatim_in(SUBS[0].answer, "Scurvy is prevented by vitamin D")  # the full stop is part of it
    assert not verbatim_in("", final)


def test_key_tokens_are_what_the_answer_adds_to_its_question():
    assert key_tokens("15% of 240 is 36. That is 0.15 x 240.", "What is 15% of 240?") == ["36"]
    assert key_tokens(SUBS[0].answer, SUBS[0].question) == ["d"]
    assert key_tokens("Eight legs.", "How many legs does a spider have?") == ["8"]  # number words are digits


def test_part_reaches_final_join_needs_verbatim_model_accepts_the_key_fact():
    restated = "Scurvy is prevented by vitamin D. 15% of 240 works out to 36."
    join = [part_reaches_final(s, restated, "join") for s in SUBS]
    model = [part_reaches_final(s, restated, "model") for s in SUBS]
    assert [r["reached"] for r in join] == [True, False]  # join: the second answer is not there verbatim
    assert [r["reached"] for r in model] == [True, True]
    assert model[1] == {"index": 2, "verbatim": False, "key_fact": True, "reached": True, "key": ["36"]}
    changed = "Vitamin C prevents scurvy. 15% of 240 is 36."  # the aggregator "corrected" the expert
    assert not part_reaches_final(SUBS[0], changed, "model")["reached"]
    assert not part_reaches_final(SUBS[1], "15% of 240 is 24.", "model")["reached"]
    with pytest.raises(ValueError):
        score_query("x", "joined", "", QUERY, SUBS)


def test_key_fact_must_sit_in_one_sentence():
    painter = SubAnswer(1, "Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.")
    assert key_tokens(painter.answer, painter.question) == ["leonardo", "da", "vinci"]
    assert part_reaches_final(painter, "It was Leonardo da Vinci, in Florence.", "model")["reached"]
    assert not part_reaches_final(painter, "It was Leonardo. Da Vinci is a town.", "model")["reached"]
    assert not part_reaches_final(painter, "It was Leonardo.", "model")["reached"]


def test_answer_that_only_repeats_its_question_falls_back_to_verbatim():
    echo = SubAnswer(1, "What is the capital of France?", "The capital of France.")
    assert key_tokens(echo.answer, echo.question) == []
    assert part_reaches_final(echo, "1. The capital of France.", "model")["reached"]
    assert not part_reaches_final(echo, "France has a capital.", "model")["reached"]


def test_unsupported_sentences_flags_filler_and_changed_facts_not_restatements():
    final = ("Vitamin D prevents scurvy. 15% of 240 equals 36. Scurvy is prevented by vitamin C. "
             "I hope this helps! Part 1: Which vitamin prevents scurvy?")
    rep = unsupported_sentences(final, QUERY, SUBS)
    assert rep["sentences"] == 5 and rep["unsupported"] == 2
    assert rep["unsupported_text"] == ["Scurvy is prevented by vitamin C.", "I hope this helps!"]
    assert rep["empty"] == 1  # the repeated sub-question claims nothing: not unsupported, but counted
    rows = {r["sentence"]: r for r in rep["rows"]}
    assert rows["15% of 240 equals 36."]["words"] == ["equal", "36"]  # 15 and 240 are the question's own words
    assert rows["15% of 240 equals 36."]["coverage"] == SUPPORT_THRESHOLD == 0.5  # a paraphrase: supported
    assert unsupported_sentences(final, QUERY, SUBS, threshold=2 / 3)["unsupported"] == 3


def test_the_querys_own_list_numbers_are_not_question_words():
    query = "1. How many days are in a week? 2. What is the capital of Egypt?"
    subs = [SubAnswer(1, "How many days are in a week?", "A week has 7 days."),
            SubAnswer(2, "What is the capital of Egypt?", "Cairo.")]
    rep = unsupported_sentences("1. A week has 7 days.\n2. Cairo.", query, subs)
    assert [r["words"] for r in rep["rows"]] == [["7"], ["cairo"]] and rep["empty"] == 0


def test_invented_facts_around_a_restated_answer_are_unsupported():
    subs = [SubAnswer(1, "What is the capital of Australia?", "The capital of Australia is Canberra.")]
    query = "What is the capital of Australia?"
    assert unsupported_sentences("Canberra is the capital of Australia.", query, subs)["unsupported"] == 0
    assert unsupported_sentences("Canberra, founded in 1913.", query, subs)["unsupported"] == 1


def test_join_output_is_fully_supported_and_pipeline_notes_are_not_sentences():
    final = ("1. Scurvy is prevented by vitamin D.\n2. (not answered: depends on q0:1, which failed)\n"
             "(Not answered: questions 9-12 of 12 were not answered: at most 8 are (decomposer.max_subqueries).)")
    rep = unsupported_sentences(final, QUERY, [SUBS[0], SubAnswer(2, "What is 15% of 240?", "", ok=False)])
    assert (rep["sentences"], rep["unsupported"], rep["notes"]) == (1, 0, 2)


def test_contains_gold_whole_words_units_number_words_and_cjk():
    assert contains_gold("Water freezes at 0°C.", ["0", "zero"])
    assert contains_gold("A spider has eight legs.", ["8"])
    assert contains_gold("There are 1,440 minutes in a day.", ["1440"])
    assert contains_gold("Its formula is H₂O.", ["H2O"])
    assert not contains_gold("It is 100 degrees.", ["0", "10"])  # whole numbers only
    assert not contains_gold("George W. Bush", ["George H. W. Bush", "George Bush"])
    assert contains_gold("法国的首都是巴黎。", ["巴黎", "Paris"])
    assert not contains_gold("", ["Paris"])


def test_part_correct_final_and_expert_and_list_markers_are_not_answers():
    join = "1. Scurvy is prevented by vitamin D.\n2. 15% of 240 is 36."
    assert part_correct(join, SUBS, GOLD.parts) == [{"part": 0, "final": False, "expert": False},
                                                    {"part": 1, "final": True, "expert": True}]
    two = [GoldPart("What is the smallest prime number?", ("2", "two"))]
    assert part_correct("1. It is one.\n2. Not sure.", [SubAnswer(1, "q", "It is one.")], two)[0]["final"] is False


def test_chain_score_counts_leaves_and_both_gold_parts():
    gold = CompoundQuestion("c", CHAIN_QUERY, (GoldPart("Who wrote Romeo and Juliet?", ("Shakespeare",)),
                                               GoldPart("Where?", ("England",), (0,))), "chained")
    assert gold.leaves == (1,)
    join = score_query("c", "join", CHAIN[1].answer, CHAIN_QUERY, CHAIN, gold).counts()
    assert (join["must_carry"], join["reached"], join["final_correct"], join["gold_parts"]) == (1, 1, 2, 2)
    assert (join["final_correct_leaves"], join["gold_leaves"], join["missing"]) == (1, 1, False)
    model = score_query("c", "model", "Shakespeare was born in England, in Stratford-upon-Avon, in 1564.", CHAIN_QUERY,
                        CHAIN, gold).counts()
    assert (model["reached"], model["sentences"], model["unsupported"]) == (0, 1, 1)  # "william" dropped, town added


def test_missing_parts_must_be_said():
    failed = [SUBS[0], SubAnswer(2, "What is 15% of 240?", "", ok=False)]
    assert missing_stated("1. ...\n2. (not answered: timed out)", failed) is True
    assert missing_stated("Scurvy is prevented by vitamin D.", failed) is False
    assert missing_stated("anything", SUBS) is None
    assert missing_stated("(Not answered: question 9 of 9 was not answered)", SUBS, omitted="question 9") is True


def test_aggregate_sums_counts_and_shares():
    a = score_query("a", "join", "1. Scurvy is prevented by vitamin D.\n2. 15% of 240 is 36.", QUERY, SUBS, GOLD)
    b = score_query("b", "model", "Vitamin C. I hope this helps!", QUERY, SUBS, GOLD)
    total = aggregate([a.counts(), b.counts()])
    assert total["queries"] == 2 and total["must_carry"] == 4 and total["reached"] == 2
    assert total["share_reached"] == 0.5
    assert total["share_unsupported"] == 2 / 4  # b: both sentences unsupported; a: none
    assert total["final_accuracy"] == 2 / 4 and total["expert_accuracy"] == 2 / 4
    assert aggregate([])["share_reached"] is None
    json.dumps(a.to_dict())  # serialisable as stored by the benchmark


def test_the_compound_question_set_is_well_formed():
    questions = load_questions(SET)
    assert 35 <= len(questions) <= 50
    kinds = {k: sum(q.kind == k for q in questions) for k in ("independent", "chained", "numbered", "mixed")}
    assert kinds["chained"] + kinds["mixed"] >= 10 and kinds["numbered"] >= 3
    assert all(2 <= len(q.parts) <= 4 for q in questions if q.id != "num-12")
    assert len(next(q for q in questions if q.id == "num-12").parts) == 12  # over the planner's cap of 8
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in q.query) for q in questions)
    for q in questions:  # every part's own question answered by its gold is found by the scorer
        for p in q.parts:
            assert contains_gold(p.gold[0], p.gold), (q.id, p.gold)


def test_load_questions_rejects_defects(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"id": "x", "query": "A? B?", "kind": "independent",
            "parts": [{"question": "A?", "gold": ["x"], "depends_on": []}, {"question": "B?", "gold": ["y"],
                                                                            "depends_on": []}]}
    for change in ({"kind": "chained"}, {"parts": good["parts"][:1]}, {"extra": 1},
                   {"parts": [good["parts"][0], {"question": "B?", "gold": ["y"], "depends_on": [1]}]},
                   {"parts": [good["parts"][0], {"question": "B?", "gold": ["the"], "depends_on": []}]}):
        bad.write_text(json.dumps({**good, **change}) + "\n")
        with pytest.raises(ValueError):
            load_questions(bad)
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_questions(bad)


def test_model_aggregator_prompt_restates_answers_and_gives_chain_steps_as_background():
    from compllm.runtime.prompts import Aggregator, quote

    agg = Aggregator("default", "Combine.", mode="model")
    user = agg.request(QUERY, [("1", SUBS[0].question, SUBS[0].answer), ("2", SUBS[1].question, SUBS[1].answer)]
                       ).messages[-1]["content"]
    assert SUBS[0].question not in user  # nothing to repeat: the sub-questions are not shown beside the answers
    assert "- «Scurvy is prevented by vitamin D.»\n- «15% of 240 is 36.»" in user
    assert "Write 2 sentences, one per part, as a numbered list (1., 2.)" in user and "all of its words" in user
    step = quote(CHAIN[0].answer, 400)  # as `fill` quoted it into the dependent's question
    parts = [("1", CHAIN[0].question, CHAIN[0].answer), ("2", f"In which country was {step} born?", CHAIN[1].answer),
             ("3", "What is 15% of 240?", "15% of 240 is 36.")]
    mixed = agg.request(CHAIN_QUERY, parts, chained=True).messages[-1]["content"]
    assert f"Facts found on the way:\n- {CHAIN[0].question} {step}\n" in mixed  # the chain's step: background
    assert ("Facts from experts (2 parts):\n- «William Shakespeare was born in England.»\n- «15% of 240 is 36.»"
            in mixed)
    chain = agg.request(CHAIN_QUERY, parts[:2], chained=True).messages[-1]["content"]
    assert "Answer from the last step:\n- «William Shakespeare was born in England.»" in chain
    assert chain.endswith("Nothing else.") and "Write one sentence that gives the answer from the last step" in chain
    assert agg.request(CHAIN_QUERY, parts[:2], chained=False).messages[-1]["content"].count("\n- ") == 2
    # the planner often marks a dependency without writing #1 (nothing quoted): the caller can name the steps
    unquoted = [parts[0], ("2", "In which country was that author born?", CHAIN[1].answer)]
    assert "Facts found on the way" not in agg.request(CHAIN_QUERY, unquoted, chained=True).messages[-1]["content"]
    told = agg.request(CHAIN_QUERY, unquoted, chained=True, steps={"1"}).messages[-1]["content"]
    assert "Answer from the last step:\n- «William Shakespeare was born in England.»" in told
