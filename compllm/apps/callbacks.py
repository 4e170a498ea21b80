"""A failed job is reported in one line, and a `-m` sweep goes on with its next job.

Jobs raise instead of calling sys.exit (which would end the whole sweep): Hydra records the job as FAILED and runs
the next one. `ReportFailures` (registered under `hydra.callbacks` in conf/config.yaml) says why the job failed on
stderr, in the job's log and in `error.txt` in its output dir; `exit_status` turns the record into exit status 2
when every failure was the user's to fix, as for any other usage error.
"""
from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

ERROR_FILE = "error.txt"


class JobFailed(CompactHydraException):
    """A job's user error (UsageError or one of compllm.errors.KNOWN_ERRORS). Hydra prints a CompactHydraException
    as its message alone, so a sweep that ends with a failed job shows a line, not a traceback."""


@dataclass(frozen=True)
class Failure:
    job: str  # "#0 (queries_file=/x)" in a sweep, "" in a single run
    message: str
    error_file: Path
    user_error: bool


FAILURES: list[Failure] = []  # this process's failed jobs (Hydra's basic launcher runs them all in-process)


def exit_status(code: Any) -> Any:
    """Hydra exits 1 after a failed job; make it 2 if every failure was a user error (a crash keeps 1)."""
    if code == 1 and FAILURES and all(f.user_error for f in FAILURES):
        return 2
    return code


def _shown(path: Path) -> str:
    """A path relative to the working dir when it is below it: shorter in a one-line message."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _log_to_files(message: str) -> None:
    """Into the job's log file(s) only: the console already has the line on stderr."""
    record = logging.LogRecord("compllm", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class ReportFailures(Callback):
    """One line per failed job: stderr, the job's log, `<job dir>/error.txt` (with the traceback for a crash)."""

    def __init__(self) -> None:
        self._first: Optional[JobFailed] = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        FAILURES.clear()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        FAILURES.clear()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A rerun into the same dir (experiments resume) must not keep an earlier run's error.txt."""
        Path(config.hydra.runtime.output_dir, ERROR_FILE).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status is not JobStatus.FAILED:
            return
        exc = job_return._return_value  # the public .return_value re-raises, and writes to stderr first
        user_error = isinstance(exc, JobFailed)
        sweep = config.hydra.mode == RunMode.MULTIRUN
        job = f"#{config.hydra.job.num} ({' '.join(job_return.overrides or [])})" if sweep else ""
        message = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        error_file = Path(config.hydra.runtime.output_dir) / ERROR_FILE
        details = "" if user_error else "\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error_file.write_text(message + "\n" + details, encoding="utf-8")
        FAILURES.append(Failure(job, message, error_file, user_error))
        where = f"job {job}: " if sweep else ""
        line = f"compllm: error: {where}{message}" if user_error else \
            f"compllm: {where}crashed: {message} (traceback in {_shown(error_file)})"
        _log_to_files(line)
        if user_error or sweep:  # a crash in a single run: Hydra prints its traceback next
            print(line, file=sys.stderr, flush=True)
        if sweep and user_error:
            self._first = self._first or exc
            self._first.args = (self._summary(),)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run that failed with a user error ends here, with status 2: its line is already printed
        (Hydra would add an 'Error executing job' line and exit 1)."""
        if FAILURES and all(f.user_error for f in FAILURES):
            sys.stderr.flush()
            sys.exit(2)

    def _summary(self) -> str:
        """What Hydra prints last when a sweep had failed jobs: which ones, and where each says why."""
        failed = [f for f in FAILURES if f.user_error]
        jobs = ", ".join(f.job.split(" ", 1)[0] for f in failed)
        if len(failed) == 1:
            return f"compllm: error: sweep job {jobs} failed; why: {_shown(failed[0].error_file)}"
        return (f"compllm: error: {len(failed)} sweep jobs failed ({jobs}); each one's {ERROR_FILE} says why, "
                f"e.g. {_shown(failed[0].error_file)}")
