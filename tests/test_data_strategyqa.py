"""StrategyQA loader: real data when bigbench is installed, an actionable error when it is not."""
import json

import pytest

from compllm.data import strategyqa
from compllm.data.strategyqa import StrategyQAItem, load_strategyqa, split_sentences
from compllm.models.errors import MissingPackageError

installed = pytest.mark.skipif(strategyqa.package_dir(strategyqa.MODULE) is None, reason="bigbench not installed")


@installed
def test_real_data_counts_and_fields():
    items = load_strategyqa()
    assert len(items) == 2290
    assert sum(i.answer for i in items) == 1071  # 1,219 "No"
    assert [i.id for i in items[:2]] == ["strategyqa-0000", "strategyqa-0001"]
    assert len({i.id for i in items}) == 2290
    first = items[0]
    assert first.question == "Is it common to see frost during some college commencements?"
    assert first.answer is True
    assert first.facts[0].startswith("College commencement ceremonies often happen")
    assert items[2].question == "Would a pear sink in water?" and items[2].answer is False
    assert all(i.facts and all(f.strip() == f and f for f in i.facts) for i in items)
    assert not any(f.startswith(("Yes.", "No.")) for i in items for f in i.facts)
    assert load_strategyqa() is items  # cached


@installed
def test_facts_keep_initials_and_titles_together():
    by_id = {i.id: i for i in load_strategyqa()}
    assert "The Church of Scientology was founded by L. Ron Hubbard." in by_id["strategyqa-2219"].facts


def test_split_sentences():
    text = ("John F. Kennedy was shot. Dr. Seuss wrote books. Hippolytus (c. 170-235 AD) led a group. "
            "P. G. Wodehouse died in 1975. Robert Downey Jr. starred in it. World War I. The end.")
    assert split_sentences(text) == [
        "John F. Kennedy was shot.", "Dr. Seuss wrote books.", "Hippolytus (c. 170-235 AD) led a group.",
        "P. G. Wodehouse died in 1975.", "Robert Downey Jr. starred in it.", "World War I.", "The end."]
    assert split_sentences("H is next to the letter T. The bonus round gives R.") == [
        "H is next to the letter T.", "The bonus round gives R."]


def _fake_package(tmp_path, monkeypatch, examples):
    task = tmp_path / "bigbench" / strategyqa.FILE
    task.parent.mkdir(parents=True)
    task.write_text(json.dumps({"name": "strategyqa", "examples": examples}), encoding="utf-8")
    monkeypatch.setattr(strategyqa, "package_dir", lambda module: tmp_path / module)
    load_strategyqa.cache_clear()


def test_parses_a_task_file(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, [
        {"input": " Is water wet? ", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. Water is a liquid. It wets."},
        {"input": "Can a fish climb?", "target_scores": {"Yes": 0, "No": 1}, "target": "No. Fish have fins."},
    ])
    try:
        assert load_strategyqa() == (
            StrategyQAItem("strategyqa-0000", "Is water wet?", True, ("Water is a liquid.", "It wets.")),
            StrategyQAItem("strategyqa-0001", "Can a fish climb?", False, ("Fish have fins.",)))
    finally:
        load_strategyqa.cache_clear()


def test_verdict_disagreeing_with_scores_is_rejected(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, [
        {"input": "Q?", "target_scores": {"Yes": 1, "No": 0}, "target": "No. Contradiction."}])
    try:
        with pytest.raises(ValueError, match="does not start with the gold verdict"):
            load_strategyqa()
    finally:
        load_strategyqa.cache_clear()


def test_missing_package_is_actionable(monkeypatch):
    monkeypatch.setattr(strategyqa, "package_dir", lambda module: None)
    load_strategyqa.cache_clear()
    try:
        with pytest.raises(MissingPackageError) as err:
            load_strategyqa()
    finally:
        load_strategyqa.cache_clear()
    msg = str(err.value)
    assert "StrategyQA" in msg and "bigbench==1.0.0" in msg
    assert "pip-26.2.1-py3-none-any.whl/pip install --no-deps bigbench==1.0.0" in msg
    assert err.value.requirements == ["bigbench==1.0.0"]


def test_installed_package_without_the_file(tmp_path, monkeypatch):
    (tmp_path / "bigbench").mkdir()
    monkeypatch.setattr(strategyqa, "package_dir", lambda module: tmp_path / module)
    with pytest.raises(MissingPackageError, match="lack the expected file"):
        strategyqa.strategyqa_path()
