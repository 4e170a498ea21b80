"""`compllm` console script: compose conf/, build the pipe, run the task, write results into the Hydra run dir."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from compllm.config.schema import register

log = logging.getLogger("compllm")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register()


class UsageError(ValueError):
    pass


def read_queries(cfg: DictConfig) -> list[str]:
    if cfg.query and cfg.queries_file:
        raise UsageError("give either query=... or queries_file=..., not both")
    if cfg.query:
        return [str(cfg.query)]
    if cfg.queries_file:
        path = Path(hydra.utils.to_absolute_path(cfg.queries_file))
        if not path.is_file():
            raise UsageError(f"queries_file {str(path)!r} does not exist")
        queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not queries:
            raise UsageError(f"queries_file {str(path)!r} holds no query (one per line)")
        return queries
    raise UsageError('no query: run `compllm query="your question"` or `compllm queries_file=path.txt`')


def run_query_task(cfg: DictConfig, out_dir: Path) -> dict:
    from compllm.apps.build import build_pipeline
    from compllm.apps.report import print_result, progress_bar

    queries = read_queries(cfg)
    pipeline = build_pipeline(cfg)
    result, graph = pipeline.run(queries, progress=progress_bar(cfg.show_progress))
    payload = {"config": OmegaConf.to_container(cfg, resolve=True), "ir": graph.dump(), **result.to_dict()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    print_result(result)
    print(f"\nresult.json: {out_dir / 'result.json'}")
    return payload


TASKS = {"query": run_query_task}


def run_task(cfg: DictConfig, out_dir: Path) -> dict:
    try:
        task = TASKS[cfg.task.name]
    except KeyError:
        raise UsageError(f"unknown task {cfg.task.name!r}; known: {', '.join(TASKS)}") from None
    return task(cfg, out_dir)


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
