"""The memory budget holds in the process, measured: the default team on the shipped SmolLM2-135M, run once
without a budget (the plan's peak within 15% of the measured one), then again in a fresh process under a budget
it barely fits (that plan's peak is the budget less the compiler's headroom), where the measured peak must stay at or below the budget."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

HEADROOM = 0.05  # compiler.memory_headroom's default

QUERIES = ("Which vitamin deficiency causes scurvy? And what is 15% of 240?",
           "1. Who wrote Hamlet? 2. What is the boiling point of water in Celsius? 3. Name a prime number above 10.")


def run(tmp_path: Path, name: str, model_cache: str, *overrides: str) -> dict:
    script = Path(sys.executable).with_name("compllm")
    query_file = tmp_path / "queries.txt"
    query_file.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [str(script), "model=smollm2-135m", f"queries_file={query_file}", f"cache_dir={model_cache}",
         "show_progress=false", f"hydra.run.dir={tmp_path}/{name}", *overrides],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / name / "result.json").read_text())["memory"]


def test_measured_peak_is_the_planned_peak_and_never_above_the_budget(tmp_path, model_cache):
    free = run(tmp_path, "free", model_cache)
    ratio = free["measured_peak_bytes"] / free["planned_peak_bytes"]
    assert 0.85 <= ratio <= 1.15, free
    budget = math.ceil(free["planned_peak_bytes"] / (1 - HEADROOM))  # the smallest budget this plan fits
    held = run(tmp_path, "budget", model_cache, f"compiler.memory_budget={budget}")
    assert held["budget_bytes"] == budget
    # the plan fits budget x (1 - headroom); the planner's call, made before any plan exists, is checked against
    # the budget itself
    assert held["planned_plan_peak_bytes"] <= budget * (1 - HEADROOM) and held["planned_peak_bytes"] <= budget
    assert held["measured_peak_bytes"] <= budget, (
        f"measured {held['measured_peak_bytes'] / 2**30:.3f} GiB above the budget {budget / 2**30:.3f} GiB")
