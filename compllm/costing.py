"""Compatibility shim: the cost model now comes from `compllm.calibration` (see its package docstring).

Kept only so callers with the old signature (`compllm/pipeline.py`, `experiments/bench_latency.py`) run until
they call `compllm.calibration.build_cost_model(pool, experts_to_alias, cache_dir, auto_calibrate, progress)`;
delete this file then.
"""
from __future__ import annotations

from typing import Mapping

from compiler.cost import CostModel
from compllm.calibration import build_cost_model as _build


def build_cost_model(pool, experts: Mapping, aggregator_model: str, cache_dir: str | None = None,
                     aggregator_expert: str = "aggregator", auto_calibrate: bool = False,
                     progress: bool = True) -> CostModel:
    experts_to_alias = {name: e.model for name, e in experts.items()}
    experts_to_alias[aggregator_expert] = aggregator_model
    return _build(pool, experts_to_alias, cache_dir, auto_calibrate, progress)
