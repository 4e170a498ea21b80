"""Experiment configs cannot rot: every job of every experiment composes and passes the config checks (fast, no
model); one real experiment job runs and resumes; a benchmark run killed with SIGKILL resumes to exactly the
results of an uninterrupted run. Experiments write into the user's own tree unless told the committed dir."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
COMPLLM = [sys.executable, "-m", "compllm.apps.main"]
SHORT = ("decomposer.max_new_tokens=96", "aggregator.max_new_tokens=32")  # configs are under test, not answers
COMMITTED = "experiments/results/runs"


def compllm(*args: str, cache: str, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COMPLLM_CACHE": cache, **(env or {})}
    return subprocess.run([*COMPLLM, *args, "show_progress=false"], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900, **kw)


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert "header" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]


def experiment_jobs(experiment: str) -> list[tuple[list[str], object]]:
    """(overrides, composed config with its hydra node) of every job `compllm -m experiment=<name>` launches,
    expanded from the experiment's `hydra.sweeper.params` the way the console script checks a sweep."""
    from hydra import compose, initialize_config_dir

    from compllm.apps.inputs import split_command_line
    from compllm.apps.main import CONF_DIR, sweep_jobs

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        def compose_job(overrides: list[str]):
            return compose("config", overrides=overrides, return_hydra_config=True)

        jobs = sweep_jobs(split_command_line(["-m", f"experiment={experiment}"]), compose_job)
        return [(job, compose_job(job)) for job in jobs]


@pytest.fixture(autouse=True)
def hydra_config_restored():
    """job_dir sets Hydra's global config; leave it as found for the tests that follow."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = before


def job_dir(cfg) -> str:
    """The job's output dir as Hydra resolves it: the sweep dir in the sweep's own process, where HydraConfig is
    not set (so no `${hydra:...}` in it), the subdir inside the job."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    sweep_dir = cfg.hydra.sweep.dir
    HydraConfig.instance().set_config(cfg)
    return f"{sweep_dir}/{cfg.hydra.sweep.subdir}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_point_composes_and_passes_the_checks(experiment, monkeypatch):
    """No model loads: compose each job, run check_config (weights of packages not installed here excepted, e.g.
    the 1.5B model without `make setup-large`), and resolve its run dir under the user's own tree."""
    import compllm.config.checks as checks

    weights = checks._weights_problems
    monkeypatch.setattr(checks, "_weights_problems",
                        lambda cfg: [p for p in weights(cfg) if "are not installed" not in p])
    monkeypatch.delenv("COMPLLM_EXPERIMENTS_DIR", raising=False)
    jobs = experiment_jobs(experiment)
    assert len(jobs) >= 2, "an experiment sweeps something"
    dirs = []
    for overrides, cfg in jobs:
        dirs.append(job_dir(cfg))
        task_cfg = copy.deepcopy(cfg)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        assert task_cfg.experiment_name == experiment
        assert OmegaConf.select(task_cfg, "task._target_") == "compllm.bench.runner.run"
        checks.check_config(task_cfg)
    shared = "paper_accuracy" if experiment == "paper_size" else experiment
    assert all(d.startswith(f"multirun/experiments/{shared}/") for d in dirs), dirs  # never the committed runs
    assert len(set(dirs)) == len(dirs), "every job has its own dir"


def test_the_committed_results_are_only_written_by_make_experiment(monkeypatch):
    """`make experiment` names the committed dir; each experiment's job dirs there are the ones committed."""
    monkeypatch.setenv("COMPLLM_EXPERIMENTS_DIR", COMMITTED)
    for experiment in ("paper_accuracy", "paper_size", "paper_latency"):
        dirs = {job_dir(cfg) for _, cfg in experiment_jobs(experiment)}
        committed = {str(p.parent.relative_to(ROOT)) for p in (ROOT / COMMITTED).glob("*/*/results.jsonl")}
        shared = "paper_accuracy" if experiment == "paper_size" else experiment
        assert {d for d in dirs if d.startswith(f"{COMMITTED}/{shared}/")} == dirs
        assert dirs & committed, f"{experiment}: none of {sorted(dirs)} is a committed run dir"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^experiment:.*\n\tCOMPLLM_EXPERIMENTS_DIR={COMMITTED} ", makefile, re.M)


@pytest.mark.model
@pytest.mark.sweep
def test_one_experiment_job_runs_and_a_rerun_resumes(tmp_path, model_cache):
    """`-m experiment=paper_latency` narrowed to one job (system=compiled), 2 items on SmolLM2-135M."""
    # model= on the command line beats the systems' own model choice; system= narrows the sweep to one job
    args = ("-m", "experiment=paper_latency", "system=compiled", "model=smollm2-135m", "task.limit=2", *SHORT)
    env = {"COMPLLM_EXPERIMENTS_DIR": str(tmp_path / "exp")}
    proc = compllm(*args, cache=model_cache, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "exp" / "paper_latency" / "compiled"
    summary = json.loads((run / "summary.json").read_text())
    assert sum(m["n"] for m in summary["metrics"].values()) == 2
    first = records(run / "results.jsonl")
    assert len(first) == 2
    (trace,) = run.glob("traces/*.json")  # one chunk: its Chrome trace
    assert any(e.get("ph") == "X" for e in json.loads(trace.read_text())["traceEvents"])

    again = compllm(*args, cache=model_cache, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 items, 2 already in" in again.stdout + again.stderr  # resumed: nothing answered twice
    assert records(run / "results.jsonl") == first
    assert not (tmp_path / "experiments").exists()  # nothing written outside the user's experiments dir


@pytest.mark.model
@pytest.mark.sweep
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, model_cache):
    common = ["task=bench", "benchmark=meqa_all", "system=compiled", "model=smollm2-135m", "task.limit=6",
              "task.chunk_size=1", *SHORT]
    whole = compllm(*common, f"hydra.run.dir={tmp_path}/whole", cache=model_cache, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    results = tmp_path / "killed" / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COMPLLM_CACHE": model_cache}
    proc = subprocess.Popen([*COMPLLM, *common, f"hydra.run.dir={tmp_path}/killed", "show_progress=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(records(results))
    assert 2 <= done_before < 6, "the kill should land mid-run"

    resumed = compllm(*common, f"hydra.run.dir={tmp_path}/killed", cache=model_cache, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = records(results), records(tmp_path / "whole" / "results.jsonl")
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want)  # every item exactly once
    answers = lambda rs: {r["id"]: r["answer"]["final_answer"] for r in rs}  # noqa: E731
    assert answers(got) == answers(want)
