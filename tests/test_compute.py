"""Parameter-compute per answer: a benchmark record keeps the engine's token counts of every call it made, and the
estimate the report uses for records written before they were kept (`compllm.bench.compute.estimated_calls`)
rebuilds the same calls with the same counts, on SmolLM2-135M (the shipped model) through `compllm -m`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compllm.bench.compute import NotEstimable, estimated_calls, hf_counters, param_compute

ROOT = Path(__file__).resolve().parents[1]


def run_system(system: str, tmp_path: Path, cache: str, *extra: str) -> tuple[list[dict], dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COMPLLM_CACHE": cache,
           "COMPLLM_EXPERIMENTS_DIR": str(tmp_path / "exp")}
    args = ["-m", "experiment=paper_accuracy", f"system={system}", "model=smollm2-135m", "task.limit=3",
            "show_progress=false", *extra]
    proc = subprocess.run([sys.executable, "-m", "compllm.apps.main", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "exp" / "paper_accuracy" / system
    lines = (run / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]], yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def model_path(config: dict, cache: str) -> str:
    from hydra.utils import instantiate

    return instantiate(config["models"]["default"]["source"]).materialize(cache, "bfloat16").path


@pytest.mark.model
@pytest.mark.parametrize("system, extra", [("compiled", ()), ("monolithic", ("system.max_new_tokens=40",))])
def test_recorded_calls_and_their_estimate_agree(system, extra, tmp_path, model_cache):
    records, config = run_system(system, tmp_path, model_cache, *extra)
    count_prompt, count_text = hf_counters(model_path(config, model_cache))
    assert any(sq["depends_on"] for r in records for sq in r["answer"]["subqueries"]) or system != "compiled"
    for record in records:
        recorded = record["answer"]["calls"]
        parts = len(record["parts"])
        assert len(recorded) == (parts if system == "compiled" else 1)  # meqa: numbered questions, no planner call
        assert all(c["model"] == "default" and c["prompt_tokens"] > 20 and c["output_tokens"] >= 1 for c in recorded)
        estimate = estimated_calls(record, config, {"default": count_prompt}, {"default": count_text})
        assert [c["prompt_tokens"] for c in estimate] == [c["prompt_tokens"] for c in recorded]
        for got, want in zip(estimate, recorded):  # the answer text is stripped, so a trailing space may be lost
            assert abs(got["output_tokens"] - want["output_tokens"]) <= 1, (got, want)
        assert param_compute(recorded, {"default": 10}) == 10 * sum(c["prompt_tokens"] + c["output_tokens"]
                                                                     for c in recorded)


def test_a_split_written_by_a_planner_is_not_estimated():
    record = {"query": "q", "answer": {"final_answer": "a", "subqueries": [],
                                       "decomposition": {"format": "json", "fallback": False}}}
    config = {"system": {"_target_": "compllm.bench.systems.Composed"}, "experts": {}}
    with pytest.raises(NotEstimable, match="planner"):
        estimated_calls(record, config, {}, {})
