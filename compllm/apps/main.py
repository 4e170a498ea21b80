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

    return {"query": query.run, "explain": explain.run, "calibrate": calibrate.run}


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
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
