"""Calibration: measure each model's costs on this machine once (timings and memory), store them, and build the
compiler's cost model from them (estimates from the model's files where nothing was measured).

Modules, one job each: `measure` (timing rounds and the noise verdict), `contention` (is the machine busy?),
`probe` (what is timed and measured on an hf model), `facts` (estimates without loading), `store` (the file, its
lock), `build` (the cost model of a run), `recheck` (after a run: drop an entry reality contradicts).
Memory is read with `compllm.runtime.memory`.

Use from a run (once per process):
    prepare:  router.fit(...)  ->  cost = build_cost_model(pool, experts_to_alias, cache_dir, auto_calibrate,
              progress)  ->  load the models (a model calibrated just now is already loaded)
    run end:  recheck_calibration(cache_dir, plan, step_records, cost, others_cpu=meter.others_share())
              with `meter = contention.CpuMeter.start()` taken when execution starts (optional).
"""
from compllm.calibration.build import (
    Calibration,
    ModelInfo,
    build_cost_model,
    calibrate,
    calibration_key,
    describe,
    loaded_key,
    measure_base_bytes,
)
from compllm.calibration.facts import ModelFacts, estimated_cost, model_facts
from compllm.calibration.measure import Protocol, Verdict
from compllm.calibration.recheck import recheck_calibration
from compllm.calibration.store import CalibrationStore, calibration_path

__all__ = [
    "Calibration", "CalibrationStore", "ModelFacts", "ModelInfo", "Protocol", "Verdict", "build_cost_model",
    "calibrate", "calibration_key", "calibration_path", "describe", "estimated_cost", "loaded_key",
    "measure_base_bytes", "model_facts", "recheck_calibration",
]
