"""`compllm` console script: compose conf/, build the pipe, run the task, write results into the Hydra run dir."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from compllm.apps.inputs import UsageError
from compllm.config.schema import register

log = logging.getLogger("compllm")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register()


def _tasks() -> dict:
    from compllm.apps import calibrate, explain, query
    from compllm.bench import runner

    return {"query": query.run, "explain": explain.run, "calibrate": calibrate.run, "bench": runner.run}


def quiet_libraries() -> None:
    """Keep the console for compllm's own story: no per-tensor progress bars or library chatter."""
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_task(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the configured task, writing its files into `out_dir` (the Hydra run dir)."""
    quiet_libraries()
    tasks = _tasks()
    if cfg.task.name not in tasks:
        raise UsageError(f"unknown task {cfg.task.name!r}; known: {', '.join(tasks)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return tasks[cfg.task.name](cfg, out_dir)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from compllm.errors import KNOWN_ERRORS

    try:
        run_task(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (UsageError, *KNOWN_ERRORS) as exc:
        # Expected, actionable failures: one clear message, no traceback.
        print(f"compllm: error: {exc}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            log.error("job failed: %s", exc)  # the sweep goes on: say which job failed, in its log too
        sys.exit(2)


def compose_problem(overrides: list[str]) -> str | None:
    """Compose the config the way the app will, and return Hydra's complaint as one line (None if it composes).

    Hydra prints composition errors over several lines and exits 1; a bad override is a usage error like any
    other, so it gets compllm's one-line message and exit status 2. Flags (-m, --help, --cfg) go to Hydra as is.
    """
    if any(arg.startswith("-") for arg in overrides):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        return one_line(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. Hydra's internal AssertionError on `model='${gib:1}'`
        detail = f": {one_line(exc)}" if str(exc).strip() else ""
        return f"cannot compose the config from {' '.join(overrides)} ({type(exc).__name__}{detail}); check the values"
    return None


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


def main() -> None:
    problem = compose_problem(sys.argv[1:])
    if problem is not None:
        print(f"compllm: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
