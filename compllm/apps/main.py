"""`compllm` console script: compose conf/, build the pipe, run the task, write results into the Hydra run dir."""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from compllm.apps.callbacks import JobFailed, exit_status
from compllm.apps.inputs import CONF_DIR, QUERY_ENV, CommandLine, UsageError, blank_query_problem, config_roots, \
    override_key, split_command_line
from compllm.config.schema import register

log = logging.getLogger("compllm")
APPS_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "config"

register()


def quiet_libraries() -> None:
    """Keep the console for compllm's own story: no per-tensor progress bars or library chatter."""
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def make_task(node: DictConfig) -> Callable[[DictConfig, Path], Any]:
    """The task's `run` function (conf/task/*.yaml: `_target_` + `_partial_`), its options already bound."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as exc:
        raise UsageError(f"task._target_={node.get('_target_')!r} cannot be loaded ({one_line(exc)}); "
                         f"pick a task: task=query, task=explain, task=calibrate, task=bench or task=serve") from None


def run_task(cfg: DictConfig, out_dir: Path) -> Any:
    """Run the configured task, writing its files into `out_dir` (the Hydra run dir)."""
    quiet_libraries()
    task = make_task(cfg.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    return task(cfg, out_dir)


@hydra.main(config_path=CONF_DIR, config_name=CONFIG_NAME, version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    """One job. It raises, never exits: a failed job must not end a -m sweep (compllm/apps/callbacks.py reports it)."""
    from compllm.errors import KNOWN_ERRORS

    try:
        run_task(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (UsageError, *KNOWN_ERRORS) as exc:  # expected, actionable: one line, no traceback
        raise JobFailed(str(exc)) from exc


# --------------------------------------------------------------------------- compose-time checks


@contextmanager
def question_in_env(question: Optional[str]) -> Iterator[None]:
    """Compose with the question where conf/config.yaml reads it, and put the environment back afterwards."""
    old = os.environ.get(QUERY_ENV)
    if question is not None:
        os.environ[QUERY_ENV] = question
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(QUERY_ENV, None)
        else:
            os.environ[QUERY_ENV] = old


def config_source(line: CommandLine) -> tuple[str, str, list[str]]:
    """(primary config dir, config name, extra overrides) for --config-path, --config-name and --config-dir, the
    way Hydra reads them: --config-path is relative to the file declaring @hydra.main (this one)."""
    config_dir = line.flags.get("--config-path") or CONF_DIR
    config_dir = str((APPS_DIR / config_dir).resolve())
    if not Path(config_dir).is_dir():
        raise UsageError(f"--config-path {line.flags['--config-path']}: no such directory ({config_dir})")
    extra = []
    if line.flags.get("--config-dir"):
        added = Path(line.flags["--config-dir"]).resolve()
        if not added.is_dir():
            raise UsageError(f"--config-dir {line.flags['--config-dir']}: no such directory ({added})")
        extra.append(f"hydra.searchpath=['file://{added}']")
    return config_dir, line.flags.get("--config-name") or CONFIG_NAME, extra


def sweep_jobs(line: CommandLine, compose: Callable[[list[str]], DictConfig]) -> list[list[str]]:
    """Every job's overrides, as Hydra's BasicSweeper will launch them: the command line's sweeps crossed with the
    config's own `hydra.sweeper.params` (an experiment's), composed from the sweep's non-sweep overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # its split_arguments: no public twin
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not line.multirun:
        return [line.overrides]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(line.overrides)
    swept_hydra = [o.input_line for o in parsed if o.is_hydra_override() and o.is_sweep_override()]
    if swept_hydra:
        raise UsageError(f"sweeping over Hydra's own settings is not supported: {' '.join(swept_hydra)}")
    hydra_args = [o.input_line for o in parsed if o.is_hydra_override()]
    task_args = [o.input_line for o in parsed if not o.is_hydra_override()]
    master = compose([o.input_line for o in parsed if not o.is_sweep_override()])  # Hydra's sweep-level config
    if master.hydra.sweeper.get("_target_", "").split(".")[-1] != "BasicSweeper":
        return [hydra_args + task_args]  # another sweeper plans its own jobs: check what can be checked
    params = [f"{key}={value}" for key, value in (master.hydra.sweeper.get("params") or {}).items()]
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(params + task_args), None)
    return [hydra_args + job for job in jobs]


def job_problem(cfg: DictConfig) -> Optional[str]:
    """Checks that need the composed config and cost nothing; the rest (check_config) runs in the job."""
    return blank_query_problem(cfg.get("query"))


def line_problem(line: CommandLine) -> Optional[str]:
    """Compose every job of the command line the way the app will; the first problem as one line, else None.

    Hydra prints composition errors over several lines and exits 1, and in a sweep only once the sweep has
    started; a bad override is a usage error like any other: compllm's one-line message and exit status 2.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if not line.composes:
        return None
    try:
        config_dir, config_name, extra = config_source(line)
        with question_in_env(line.question), initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            def compose_job(overrides: list[str]) -> DictConfig:
                return compose(config_name, overrides=extra + overrides, return_hydra_config=True)

            for job in sweep_jobs(line, compose_job):
                problem = job_problem(compose_job(job))
                if problem:
                    return problem
    except UsageError as exc:
        return str(exc)
    except OverrideParseException as exc:
        return one_line(exc) + question_hint(line) + sweep_query_hint(line)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        return one_line(exc) + question_hint(line)
    except Exception as exc:  # noqa: BLE001 - e.g. Hydra's internal AssertionError on `model='${gib:1}'`
        detail = f": {one_line(exc)}" if str(exc).strip() else ""
        return f"cannot compose the config from {' '.join(line.overrides)} ({type(exc).__name__}{detail}); " \
               f"check the values"
    return None


def question_hint(line: CommandLine) -> str:
    """`compllm What is x=5?` reads `x=5` as an override: say how to keep it in the question."""
    roots = config_roots()
    odd = [arg for arg in line.overrides if re.split(r"[./]", override_key(arg), maxsplit=1)[0] not in roots]
    return f"; if {odd[0]!r} is part of your question, quote the whole question: compllm \"...\"" if odd else ""


def sweep_query_hint(line: CommandLine) -> str:
    """Under -m, query= is Hydra's to parse (`query=a,b` sweeps two questions): say how to ask one freely."""
    if line.multirun and any(override_key(arg) == "query" for arg in line.overrides):
        return ("; under -m, query= follows Hydra's sweep grammar: quote it (query=\"'a, b'\") or give the "
                'question as plain words: compllm -m ... "a, b"')
    return ""


def compose_problem(args: Sequence[str]) -> Optional[str]:
    """The command line's problem as one line (None if every job composes): what `main` checks before Hydra."""
    try:
        return line_problem(split_command_line(args))
    except UsageError as exc:
        return str(exc)


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line message (and its cause's first line) on one line, without the config search path."""
    text = str(exc).split("Config search path:")[0]
    cause = str(exc.__cause__ or "").strip().splitlines()
    if cause and cause[0] not in text:
        text += "\n" + cause[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out, listing = (lines[0] if lines else type(exc).__name__), False
    for line in lines[1:]:
        if out.endswith(":"):
            out, listing = f"{out} {line}", True  # the first item under a header such as "Available options:"
        elif listing and not line.endswith(":"):
            out += f", {line}"
        else:
            out, listing = f"{out.rstrip('.')}; {line}", False
    return out


def fail(message: str) -> None:
    print(f"compllm: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Split argv (question / Hydra), check every job composes, then hand Hydra its part; the question travels in
    $COMPLLM_QUERY so that no Hydra grammar touches it."""
    try:
        line = split_command_line(sys.argv[1:])
    except UsageError as exc:
        return fail(str(exc))
    problem = line_problem(line)
    if problem is not None:
        return fail(problem)
    if line.question is not None:
        os.environ[QUERY_ENV] = line.question
    sys.argv = [sys.argv[0], *line.hydra_args]
    try:
        _hydra_main()
    except SystemExit as exc:
        raise SystemExit(exit_status(exc.code)) from None


if __name__ == "__main__":
    main()
