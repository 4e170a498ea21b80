"""experiments/report.py's claim-1 summary: paired margins on the items all six systems answered, and a size
without its runs reported as missing, never as a margin."""
import importlib.util
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "experiments" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["report"] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def run(report, job: str, correct_rate: float, n: int, seed: int):
    rng, records = random.Random(seed), []
    for i in range(n):
        gold = ["A", "B", "C"]
        said = [g if rng.random() < correct_rate else "D" for g in gold]
        records.append({"id": f"m{i}", "kind": "meqa", "gold": {"letters": gold}, "parts": [{"domain": "law"}] * 3,
                        "answer": {"final_answer": "\n".join(f"Question {k}: {x}" for k, x in enumerate(said, 1)),
                                   "latency_s": 1.0, "partial": False}})
    return report.Run("paper_accuracy", job, {}, records)


def test_paired_margin_separates_a_real_gap_from_none(report):
    ids = {f"m{i}" for i in range(60)}
    better = report.paired_margin(run(report, "c", 0.7, 60, 1), run(report, "m", 0.3, 60, 2), ids)
    assert 25 < better["margin_points"] < 55 and better["p_value"] < 0.01
    assert better["paired_ci95_points"][0] > 0 and better["n"] == 60 and better["parts"] == 180
    same = run(report, "c", 0.5, 60, 3)
    tie = report.paired_margin(same, report.Run("paper_accuracy", "m", {}, same.records), ids)
    assert tie["margin_points"] == 0 and tie["p_value"] == 1.0


def test_summary_uses_the_common_items_and_names_missing_sizes(report, tmp_path):
    runs = [run(report, "compiled_135m", 0.5, 50, 1), run(report, "monolithic_135m", 0.2, 40, 2),
            run(report, "compiled", 0.5, 50, 3), run(report, "monolithic", 0.4, 50, 4)]
    _, summary = report.summary_section(runs, {}, tmp_path)
    assert summary["claim1_missing_sizes"] == ["1.5B"] and summary["n_meqa_p"] == 0
    assert summary["claim1_min_margin_points"] is None and summary["claim1_by_size"]["135M"]["n"] == 40
    runs += [run(report, "compiled_1.5b", 0.6, 45, 5), run(report, "monolithic_1.5b", 0.5, 45, 6)]
    _, summary = report.summary_section(runs, {}, tmp_path)
    assert summary["n_meqa_p"] == 40 and not summary["claim1_missing_sizes"]
    assert summary["claim1_min_margin_points"] == min(v["margin_points"] for v in summary["claim1_by_size"].values())
