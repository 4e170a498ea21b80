"""FanOutQA dev loader: real data when fanoutqa is installed, gold-string flattening, nested decompositions."""
import json

import pytest

from compllm.data import fanoutqa
from compllm.data.fanoutqa import (
    GoldSubQuestion,
    answer_strings,
    iter_subquestions,
    leaf_decomposition,
    load_fanoutqa_dev,
)
from compllm.data.textmetrics import answer_containment
from compllm.models.errors import MissingPackageError

installed = pytest.mark.skipif(fanoutqa.package_dir(fanoutqa.MODULE) is None, reason="fanoutqa not installed")


def G(id, deps=(), children=(), q=None):
    return GoldSubQuestion(id, q or f"question {id}?", (id,), tuple(deps), tuple(children))


def test_answer_strings_follow_fanoutqa_flattening():
    assert answer_strings({"Pat Burrell": "Right", "JD Drew": "Left"}) == ("Pat Burrell", "JD Drew", "Right", "Left")
    assert answer_strings([2006, 2012, 2006]) == ("2006", "2012", "2006")  # duplicates count, as in FanOutQA
    assert answer_strings(True) == ("yes",) and answer_strings(False) == ("no",)
    assert answer_strings(5.5) == ("5.5",)
    assert answer_strings({"Tim Kingsbury": ""}) == ("Tim Kingsbury",)  # empty annotation dropped
    assert answer_strings({"Asia": ["Macau", 680000]}) == ("Asia", "Macau", "680000")


@installed
def test_real_dev_set():
    items = load_fanoutqa_dev()
    assert len(items) == 310 and len({i.id for i in items}) == 310
    first = items[0]
    assert first.id == "7dcbbbdc7f1120cd"
    assert first.question == "What is the batting hand of each of the first five picks in the 1998 MLB draft?"
    assert first.answer_strings == ("Pat Burrell", "Mark Mulder", "Corey Patterson", "Jeff Austin", "JD Drew",
                                    "Right", "Left", "Left", "Right", "Left")
    assert [s.depends_on for s in first.decomposition] == [()] + [("bca4ab7d1f4df703",)] * 5
    assert first.decomposition[0].answer_strings[0] == "Pat Burrell"
    sizes = sorted(len(i.decomposition) for i in items)
    assert sizes[0] == 2 and sizes[-1] == 46 and sizes[155] == 6
    assert sum(len(i.decomposition) for i in items) == 1984
    assert sum(1 for i in items for s in i.decomposition if s.decomposition) == 48
    assert sum(1 for i in items for s in iter_subquestions(i.decomposition) if s.decomposition) == 51
    assert all(i.answer_strings for i in items)
    assert load_fanoutqa_dev() is items


@installed
def test_real_flattening_matches_fanoutqa_score_denominator():
    # FanOutQA scores a dict of n entries out of 2n strings and a list out of its length; the top-level dev
    # answers hold only primitives, so the flattened count is that denominator (less one empty annotation).
    raw = {r["id"]: r["answer"] for r in json.loads(fanoutqa.fanoutqa_dev_path().read_text(encoding="utf-8"))}
    for item in load_fanoutqa_dev():
        a = raw[item.id]
        expected = 2 * len(a) if isinstance(a, dict) else len(a) if isinstance(a, list) else 1
        empties = sum(1 for v in (a.values() if isinstance(a, dict) else a if isinstance(a, list) else [a])
                      if v == "")
        assert len(item.answer_strings) == expected - empties, item.id
    gold = load_fanoutqa_dev()[0].answer_strings
    # 7/10, not 4/10: as in FanOutQA, one "right" and one "left" find every repeated "Right" / "Left" value
    assert answer_containment("Pat Burrell (right), Mark Mulder (left)", gold) == pytest.approx(7 / 10)
    assert answer_containment("Pat Burrell, Mark Mulder", gold) == pytest.approx(2 / 10)


@installed
def test_real_leaf_decomposition_is_a_dag_without_nesting():
    for item in load_fanoutqa_dev():
        leaves = leaf_decomposition(item.decomposition)
        ids = [s.id for s in leaves]
        assert len(set(ids)) == len(ids)
        assert all(set(s.depends_on) <= set(ids) and not s.decomposition for s in leaves)
        assert {s.id for s in iter_subquestions(item.decomposition) if not s.decomposition} == set(ids)


def test_leaf_decomposition_substitutes_nested_graphs():
    # a; b (depends on a) is nested as b1 -> b2, b1 -> b3; c depends on b.
    nested = (G("a"), G("b", ["a"], [G("b1"), G("b2", ["b1"]), G("b3", ["b1"])]), G("c", ["b"]))
    leaves = leaf_decomposition(nested)
    assert [(s.id, s.depends_on) for s in leaves] == [
        ("a", ()), ("b1", ("a",)), ("b2", ("b1",)), ("b3", ("b1",)), ("c", ("b2", "b3"))]
    assert [s.id for s in iter_subquestions(nested)] == ["a", "b", "b1", "b2", "b3", "c"]


def _fake(tmp_path, monkeypatch, rows):
    path = tmp_path / "fanoutqa" / fanoutqa.FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    monkeypatch.setattr(fanoutqa, "package_dir", lambda module: tmp_path / module)
    load_fanoutqa_dev.cache_clear()


def test_dangling_dependency_is_rejected(tmp_path, monkeypatch):
    sub = {"id": "s1", "question": "q?", "answer": "x", "depends_on": ["nope"], "decomposition": [], "evidence": None}
    _fake(tmp_path, monkeypatch, [{"id": "t", "question": "Q?", "answer": "x", "decomposition": [sub],
                                   "categories": []}])
    try:
        with pytest.raises(ValueError, match="unknown ids"):
            load_fanoutqa_dev()
    finally:
        load_fanoutqa_dev.cache_clear()


def test_missing_package_is_actionable(monkeypatch):
    monkeypatch.setattr(fanoutqa, "package_dir", lambda module: None)
    load_fanoutqa_dev.cache_clear()
    try:
        with pytest.raises(MissingPackageError) as err:
            load_fanoutqa_dev()
    finally:
        load_fanoutqa_dev.cache_clear()
    assert "FanOutQA" in str(err.value) and "pip install --no-deps fanoutqa==1.1.1" in str(err.value)
