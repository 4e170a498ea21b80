"""Every experiment config runs end to end on SmolLM2-135M (2 items per job), so configs never rot; and a
benchmark run killed with SIGKILL resumes to exactly the results of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sweep
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))
COMPLLM = str(Path(sys.executable).with_name("compllm"))
SHORT = ("decomposer.max_new_tokens=96", "aggregator.max_new_tokens=32")  # configs are under test, not answers


def compllm(*args: str, cache: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COMPLLM_CACHE": cache}
    return subprocess.run([COMPLLM, *args, "show_progress=false"], capture_output=True, text=True, env=env,
                          timeout=900, **kw)


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert "header" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_runs(experiment, tmp_path, model_cache):
    # model= on the command line beats the systems' own model choice: every job runs on SmolLM2 here.
    proc = compllm("-m", f"experiment={experiment}", "model=smollm2-135m", "task.limit=2", *SHORT,
                   f"hydra.sweep.dir={tmp_path}", cache=model_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert summaries, proc.stderr[-2000:]
    for path in summaries:
        summary = json.loads(path.read_text())
        assert sum(m["n"] for m in summary["metrics"].values()) == 2
        assert len(records(path.with_name("results.jsonl"))) == 2
        if summary["system"].startswith(("compiled", "sequential", "no_deps", "route_only")):  # composed systems
            (trace,) = path.parent.glob("traces/*.json")  # one chunk: its Chrome trace
            assert any(e.get("ph") == "X" for e in json.loads(trace.read_text())["traceEvents"])


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, model_cache):
    common = ["task=bench", "benchmark=meqa_all", "system=compiled", "model=smollm2-135m", "task.limit=6",
              "task.chunk_size=1", *SHORT]
    whole = compllm(*common, f"hydra.run.dir={tmp_path}/whole", cache=model_cache)
    assert whole.returncode == 0, whole.stderr[-3000:]

    results = tmp_path / "killed" / "results.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COMPLLM_CACHE": model_cache}
    proc = subprocess.Popen([COMPLLM, *common, f"hydra.run.dir={tmp_path}/killed", "show_progress=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(records(results))
    assert 2 <= done_before < 6, "the kill should land mid-run"

    resumed = compllm(*common, f"hydra.run.dir={tmp_path}/killed", cache=model_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = records(results), records(tmp_path / "whole" / "results.jsonl")
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want)  # every item exactly once
    answers = lambda rs: {r["id"]: r["answer"]["final_answer"] for r in rs}  # noqa: E731
    assert answers(got) == answers(want)
