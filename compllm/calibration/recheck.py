"""After a run: do the measured generate steps agree with what the calibration made the compiler expect?

A stored calibration can be wrong in ways the measurement could not see (the machine changed, a noisy stretch
slipped through). Each executed generate step has a measured duration (`StepRecord`) and the compiler's estimate
from the same cost model (`Step.est_s`). When, for one model, at least `min_steps` steps ran and the median of
measured/estimated lies outside [1/max_ratio, max_ratio], the calibration entry that produced those estimates is
dropped, so the next run measures again. Only an entry whose numbers equal the cost model's is dropped: estimates
that came from roofline numbers, or an entry another process re-measured since, are left alone.
"""
from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from typing import Sequence

from compllm.calibration.store import CalibrationStore

log = logging.getLogger(__name__)

MIN_STEPS = 3
MAX_RATIO = 3.0
MAX_OTHERS_CPU = 0.25
LOCK_WAIT_S = 5.0  # a calibration in progress holds the lock: leave the entry rather than hold up the run


def step_ratios(plan, step_records: Sequence) -> dict[str, list[float]]:
    """Model alias -> measured/estimated seconds of each executed generate step that had an estimate."""
    estimates = {s.id: s for s in plan.steps if getattr(s.kind, "value", s.kind) == "generate"}
    ratios: dict[str, list[float]] = defaultdict(list)
    for record in step_records:
        step = estimates.get(record.step_id)
        seconds = record.end - record.start
        if step is not None and step.est_s > 0 and seconds > 0:
            ratios[step.model].append(seconds / step.est_s)
    return dict(ratios)


def recheck_calibration(cache_dir: str | None, plan, step_records: Sequence, cost_model, *,
                        min_steps: int = MIN_STEPS, max_ratio: float = MAX_RATIO,
                        others_cpu: float | None = None) -> list[str]:
    """Drop calibration entries the run contradicts; returns the WARNINGs logged (one per dropped entry).

    `others_cpu`: the share of this process's CPUs other processes used during the run
    (`contention.CpuMeter`), if known; above 25% the run itself was slowed down, so nothing is judged."""
    if plan is None or not step_records:
        return []
    if others_cpu is not None and others_cpu > MAX_OTHERS_CPU:
        log.info("not re-checking calibration: other processes used %.0f%% of the CPUs during the run", others_cpu * 100)
        return []
    warnings = []
    store = CalibrationStore(cache_dir)
    entries = None
    for alias, ratios in sorted(step_ratios(plan, step_records).items()):
        if len(ratios) < min_steps:
            continue
        ratio = statistics.median(ratios)
        if 1 / max_ratio <= ratio <= max_ratio:
            continue
        entries = store.entries() if entries is None else entries
        used = cost_model.models.get(alias)
        for key in [k for k, e in entries.items() if e.cost == used]:
            with store.lock(timeout=LOCK_WAIT_S) as locked:  # never race a calibration writing the file
                dropped = locked and store.get(key) is not None and store.get(key).cost == used and store.drop(key)
            if dropped:
                message = (f"calibration of model {alias} ({key}) is off: its {len(ratios)} generate steps took "
                           f"{ratio:.2f}x the compiler's estimate (median; limit {max_ratio:g}x either way). Dropped "
                           f"it from {store.path}; the next run measures again")
                log.warning(message)
                warnings.append(message)
    return warnings
