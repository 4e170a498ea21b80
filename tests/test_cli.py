"""The console script as a person types it: a question with any punctuation, Hydra's flags and overrides around it,
one-line errors (exit 2) for every argument form, failed jobs that do not end a sweep, unique run dirs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compllm.apps.inputs import (FLAGS_WITH_VALUE, HYDRA_FLAGS, QUERY_ENV, UsageError, read_queries_file,
                                 split_command_line)
from compllm.apps.main import compose_problem, make_task, question_in_env

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

QUESTIONS = [
    "Which vitamin prevents scurvy, and what is 15% of 240?",
    "What does 'x = a, b' mean in Python?",
    'He said "hello, world" - what language is that?',
    "Is [1, 2, 3] a list or a tuple?",
    "What is {a: 1}?",
    "What does ${HOME} expand to in bash, and ${oc.env:HOME} in OmegaConf?",
    "What is the C preprocessor's # operator for? #define X 1",
    "Is 2+2=4, or is 2+2=5?",
    "Wie viel ist 15 % von 240? Und was heißt „Skorbut“ auf Englisch?",
    "日本の首都はどこですか、そして人口は？",
    "What's the difference between choice(a,b) and range(1,5)?",
    "Backslash \\, tab\tand a trailing comma,",
    "key=value? What does ~/.bashrc do; and @decorators?",
    "(a) 1  (b) 2:   which is bigger?",
]


def compllm(*args: str, cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The console script of this checkout (not an installed copy), run in `cwd` so its outputs land there."""
    full_env = {k: v for k, v in os.environ.items() if k != QUERY_ENV}  # no question but the one under test
    full_env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "compllm.apps.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- splitting argv


def test_flag_table_matches_hydras_parser():
    from hydra._internal.utils import get_args_parser

    options = {a.option_strings[0] if a.option_strings[0].startswith("--") else a.option_strings[-1]: a
               for a in get_args_parser()._actions if a.option_strings}
    assert set(options) == set(HYDRA_FLAGS)
    for name, action in options.items():
        assert set(action.option_strings) == {name, *HYDRA_FLAGS[name]}
        takes_value = action.nargs is None and not isinstance(action.const, bool) and action.const is None \
            and action.__class__.__name__ == "_StoreAction"
        assert takes_value == (name in FLAGS_WITH_VALUE), name


@pytest.mark.parametrize("argv, question, hydra_args", [
    (["What", "is", "2+2?"], "What is 2+2?", []),
    (["model=smollm2-135m", "What is 2+2?", "policy=sequential"], "What is 2+2?", ["model=smollm2-135m", "policy=sequential"]),
    (["query=a, b", "model=smollm2-135m"], "a, b", ["model=smollm2-135m"]),
    (["++query=x=1, y"], "x=1, y", []),
    (["-cn", "config", "--config-dir", "/d", "Hi"], "Hi", ["-cn", "config", "--config-dir", "/d"]),
    (["--cfg", "job", "-p", "query", "Hi"], "Hi", ["--cfg", "job", "-p", "query"]),
    (["--info", "defaults", "Hi"], "Hi", ["--info", "defaults"]),
    (["--config-name=config", "+model@models.big=qwen2.5-coder-1.5b", "~retry"], None,
     ["--config-name=config", "+model@models.big=qwen2.5-coder-1.5b", "~retry"]),
    (["model=smollm2-135m", "--", "-5 squared?", "model=x"], "-5 squared? model=x", ["model=smollm2-135m"]),
    (["-m", "query=a,b", "system=x,y"], None, ["-m", "query=a,b", "system=x,y"]),  # -m: Hydra's sweep grammar
    (["-m", "Which is it, a or b?", "policy=level,compiled"], "Which is it, a or b?", ["-m", "policy=level,compiled"]),
])
def test_argv_is_split_into_question_and_hydra_args(argv, question, hydra_args):
    line = split_command_line(argv)
    assert line.question == question and line.hydra_args == hydra_args


@pytest.mark.parametrize("argv, message", [
    (["What", "is", "it?", "query=other"], "give the question once"),
    (["query=a", "query=b"], "query= is given more than once"),
    (["-m", "Hi", "query=a,b"], "give the question once"),
    (["-q"], "unknown option '-q'"),
    (["-cn"], "-cn needs a value"),
    (["--cfg", "job", "-m"], "use only one of"),
    (["--resolve"], "--resolve only works with --cfg"),
])
def test_contradictory_command_lines_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        split_command_line(argv)


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("form", ["positional", "query="])
def test_any_punctuation_reaches_the_config_verbatim(compose, question, form):
    line = split_command_line([question, "model=smollm2-135m"] if form == "positional"
                              else [f"query={question}", "model=smollm2-135m"])
    assert line.question == question and line.overrides == ["model=smollm2-135m"]
    with question_in_env(line.question):
        cfg = compose(*line.overrides)
        assert cfg.query == question  # oc.env hands the string over as is: `${...}` in it is not resolved
    assert compose_problem([question]) is None


def test_bare_words_are_joined_with_spaces(compose):
    line = split_command_line("Which vitamin prevents scurvy, and what is 15% of 240?".split(" "))
    assert line.question == "Which vitamin prevents scurvy, and what is 15% of 240?"


@pytest.mark.parametrize("args", [[QUESTIONS[5]], [f"query={QUESTIONS[1]}"], QUESTIONS[0].split(" ")])
def test_console_script_hands_the_question_over_verbatim(tmp_path, args):
    proc = compllm("--cfg", "job", "--resolve", *args, "model=smollm2-135m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["query"] == (args[0].removeprefix("query=") if len(args) == 1 else " ".join(args))


# --------------------------------------------------------------------------- compose-time errors


@pytest.mark.parametrize("args, message", [
    (["-m", "model=nope,smollm2-135m"], "Could not find 'model/nope'"),
    (["--multirun", "router.threshhold=0.3"], "Key 'threshhold' not in 'RouterConfig'"),
    (["--config-name", "config", "model=nope"], "Could not find 'model/nope'"),
    (["-cn", "nope"], "Cannot find primary config 'nope'"),
    (["--config-dir", CONF_DIR, "task.limit=3"], "Key 'limit' not in 'QueryTaskConfig'"),
    (["-cd", CONF_DIR, "-cn", "config", "-m", "compiler.max_batch_size=1,many"], "could not be converted to Integer"),
    (["-cd", "/nonexistent/conf", "Hi"], "--config-dir /nonexistent/conf: no such directory"),
    (["-m", "experiment=ablation_batch", "task.limit=abc"], "could not be converted to Integer"),
    (["-m", "experiment=paper_accuracy", "system=nope"], "Could not find 'system/nope'"),
    (["-m", "experiment=paper_accuracy,nope"], "Could not find 'experiment/nope'"),
    (["-m", "hydra.run.dir=a,b"], "sweeping over Hydra's own settings is not supported"),
    (["--cfg", "job", "decomposer.max_subqueries=many"], "could not be converted to Integer"),
    (["What", "is", "x=5?"], "if 'x=5?' is part of your question, quote the whole question"),
    (["query=   "], "query='   ' is empty"),
    (["   "], "query='   ' is empty"),
    (["-m", "policy=level,compiled", "query=''"], "query='' is empty"),
    (["-m", "query=a, b,"], "under -m, query= follows Hydra's sweep grammar"),
])
def test_every_argument_form_gets_a_one_line_composition_error(args, message):
    problem = compose_problem(args)
    assert problem is not None and message in problem and "\n" not in problem, problem


def test_every_sweep_point_of_the_command_line_is_checked():
    assert compose_problem(["-m", "compiler.max_batch_size=1,2,3", "policy=level,compiled"]) is None
    problem = compose_problem(["-m", "compiler.max_batch_size=1,2", "policy=level,sequential,nope"])
    assert "Could not find 'policy/nope'" in problem


def test_sweep_with_a_bad_override_exits_2_with_one_line_before_any_job(tmp_path):
    proc = compllm("-m", "policy=level,nope", "Hi", cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("compllm: error: In 'config': Could not find")
    assert not (tmp_path / "multirun").exists()


def test_queries_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("What is 2+2?\nWas heißt Skorbut?\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 0xdf on line 2\); save it as UTF-8") as err:
        read_queries_file(bad)
    assert "\n" not in str(err.value)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="holds no query"):
        read_queries_file(tmp_path / "blank.txt")
    with pytest.raises(UsageError, match="does not exist"):
        read_queries_file(tmp_path / "missing.txt")


def test_a_blank_query_is_refused_before_the_planner_even_without_the_console_script(compose, monkeypatch):
    from compllm.apps.inputs import read_queries

    monkeypatch.setenv(QUERY_ENV, " \t ")
    with pytest.raises(UsageError, match="is empty; ask a question"):
        read_queries(compose())


# --------------------------------------------------------------------------- failed jobs, exit status, run dirs


def test_failed_jobs_do_not_end_the_sweep(tmp_path):
    """Both jobs fail (no model needed): the second still runs, each writes error.txt, the process exits 2."""
    (tmp_path / "empty.txt").write_text("")
    proc = compllm("-m", f"queries_file=/nonexistent/q.txt,{tmp_path}/empty.txt", "model=smollm2-135m", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("compllm: error:")]
    assert lines[0].startswith("compllm: error: job #0 (queries_file=/nonexistent/q.txt") and "does not exist" in lines[0]
    assert lines[1].startswith("compllm: error: job #1") and "holds no query" in lines[1]
    assert "2 sweep jobs failed (#0, #1)" in lines[2] and "Traceback" not in proc.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert "does not exist" in (sweep / "0" / "error.txt").read_text()
    assert "holds no query" in (sweep / "1" / "error.txt").read_text()
    assert "compllm: error: job #1" in next((sweep / "1").glob("*.log")).read_text()  # the job's own log


def test_single_run_user_error_is_one_line_exit_2(tmp_path):
    proc = compllm("queries_file=/nonexistent/q.txt", cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr == "compllm: error: queries_file '/nonexistent/q.txt' does not exist\n"
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert (run / "error.txt").read_text().startswith("queries_file '/nonexistent/q.txt' does not exist")


def test_a_crash_keeps_its_traceback_and_exit_1(tmp_path):
    # a task function with the wrong signature: a bug, not a user error
    proc = compllm("task._target_=compllm.apps.inputs.blank_query_problem", "Hi", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "TypeError" in proc.stderr
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert "Traceback" in (run / "error.txt").read_text()


def test_two_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    """Two real processes (each a cheap failing job that still creates its run dir), started together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for _ in range(3):  # retry if the pair straddles a second boundary
        work = tmp_path / f"try{_}"
        work.mkdir()
        procs = [subprocess.Popen([sys.executable, "-m", "compllm.apps.main", f"queries_file=/nonexistent/{i}.txt"],
                                  cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(2)]
        assert [p.wait(timeout=120) for p in procs] == [2, 2]
        runs = sorted((work / "outputs").glob("*/*"))
        if len({run.name.rsplit("-", 1)[0] for run in runs}) == 1:
            break
    assert len(runs) == 2, runs  # one dir each, although started in the same second
    assert {run.name.rsplit("-", 1)[0] for run in runs} == {runs[0].name.rsplit("-", 1)[0]}
    assert sorted((run / "error.txt").read_text().split("'")[1] for run in runs) == \
        ["/nonexistent/0.txt", "/nonexistent/1.txt"]


# --------------------------------------------------------------------------- tasks


def test_each_task_is_its_target_with_its_own_options(compose):
    from compllm.apps import calibrate, explain, query
    from compllm.bench import runner

    assert make_task(compose().task).func is query.run
    assert make_task(compose("task=explain").task).func is explain.run
    bench = make_task(compose("task=bench", "task.limit=3").task)
    assert bench.func is runner.run and bench.keywords == {"limit": 3, "chunk_size": 8}
    calib = make_task(compose("task=calibrate", "task.repeats=1").task)
    assert calib.func is calibrate.run and calib.keywords == {"prompt_tokens": 256, "new_tokens": 32, "repeats": 1}


def test_a_task_refuses_another_tasks_options(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="limit"):
        compose("task=query", "task.limit=3")
    with pytest.raises(ConfigCompositionException, match="repeats"):
        compose("task=bench", "task.repeats=3")


def test_an_unloadable_task_target_is_a_usage_error(compose):
    with pytest.raises(UsageError, match=r"task._target_='compllm.nope.run' cannot be loaded .*pick a task: task=query"):
        make_task(compose("task._target_=compllm.nope.run").task)


# --------------------------------------------------------------------------- real model


@pytest.mark.model
def test_a_plain_question_with_commas_is_answered(tmp_path, model_cache):
    question = "Which vitamin prevents scurvy, and what is 15% of 240?"
    proc = compllm(question, "model=smollm2-135m", "show_progress=false", cwd=tmp_path,
                   env={"COMPLLM_CACHE": model_cache}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "outputs").glob("*/*/result.json")
    payload = json.loads(result.read_text())
    assert payload["config"]["query"] == question and payload["queries"][0]["query"] == question


@pytest.mark.model
def test_a_failing_job_does_not_stop_the_sweep(tmp_path, model_cache):
    proc = compllm("-m", "queries_file=/nonexistent/q.txt,null", "query=What is 2+2?", "model=smollm2-135m",
                   "show_progress=false", cwd=tmp_path, env={"COMPLLM_CACHE": model_cache}, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("compllm: error: job #0 (queries_file=/nonexistent/q.txt")
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert (sweep / "0" / "error.txt").exists() and not (sweep / "0" / "result.json").exists()
    assert json.loads((sweep / "1" / "result.json").read_text())["config"]["query"] == "What is 2+2?"
    assert not (sweep / "1" / "error.txt").exists()
