"""Metrics the experiment scripts report beside accuracy: StrategyQA's answer bias (bench_retrieval) and the
report's parameter-compute per answered part (recorded calls, or none known -> no number, never a guess)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_retrieval():
    return load("bench_retrieval")


@pytest.fixture(scope="module")
def report():
    return load("report")


def strategyqa_rows(golds: list[bool], says_yes) -> list[dict]:
    rows = []
    for gold in golds:
        said = says_yes(gold)
        rows.append({"item": {"gold": {"answer": gold}},
                     "sys": {"score": {"correct": said is gold, "unparsed": said is None}}})
    return rows


def test_a_system_that_always_says_yes_is_at_chance_in_balanced_accuracy(bench_retrieval):
    golds = [True] * 30 + [False] * 70
    always = bench_retrieval.answer_bias(strategyqa_rows(golds, lambda g: True), "sys", reps=200)
    assert always["yes_rate"] == 1.0 and always["gold_yes_rate"] == 0.3
    assert (always["tpr"], always["tnr"], always["balanced_accuracy"]) == (1.0, 0.0, 0.5)
    perfect = bench_retrieval.answer_bias(strategyqa_rows(golds, lambda g: g), "sys", reps=200)
    assert perfect["balanced_accuracy"] == 1.0 and perfect["balanced_ci95"] == [1.0, 1.0]
    silent = bench_retrieval.answer_bias(strategyqa_rows(golds, lambda g: None), "sys", reps=200)
    assert silent["yes_rate"] == 0.0 and silent["balanced_accuracy"] == 0.0  # no yes/no is wrong either way


def test_compute_per_part_from_recorded_calls(report):
    config = {"models": {"default": {"name": "small"}, "big": {"name": "large"}}}
    records = [{"id": "a", "parts": [{}, {}], "answer": {"calls": [
                   {"model": "default", "prompt_tokens": 90, "output_tokens": 10},
                   {"model": "big", "prompt_tokens": 40, "output_tokens": 10}]}},
               {"id": "b", "parts": [{}, {}], "answer": {"calls": []}}]
    run = report.Run("paper_accuracy", "mixed", config, records)
    calls = report.answer_calls([run], ROOT / "does-not-exist.json", estimate=False)
    params = {"small": 2, "large": 10}
    compute, how = report.compute_per_part(run, calls, params, {"a", "b"})
    assert compute == (2 * 100 + 10 * 50) / 4 and how == "recorded"
    older = report.Run("paper_accuracy", "old", config, [{"id": "a", "parts": [{}], "answer": {}}])
    assert report.compute_per_part(older, report.answer_calls([older], ROOT / "does-not-exist.json", False),
                                   params, {"a"}) == (None, "")
