"""Reading what the user asked for: one query or a file of queries."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


class UsageError(ValueError):
    """The command line asks for something impossible; the message says what to type instead."""


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
