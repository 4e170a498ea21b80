"""Calibration on the real SmolLM2-135M (fp32), with a short protocol: the memory numbers it stores are plausible."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.model

SHORT = dict(prompt_tokens=32, decode_steps=2, batch_sizes=(1, 2), min_rounds=1, max_rounds=1, warmup=False,
             max_others_cpu=1.0, max_spread=100.0, memory_rows=2)  # judge nothing: the machine may be busy


def tokenizer_bytes(directory: str) -> int:
    from transformers import AutoTokenizer

    from compllm.runtime.memory import PeakWindow, release_free_heap

    AutoTokenizer.from_pretrained(directory)  # code imported: the second load measures data only
    release_free_heap()  # else it fills heap the first one freed, and its retained bytes read low
    with PeakWindow() as window:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    del tokenizer
    return window.retained


def test_smollm2_calibration_measures_plausible_memory(compose, model_cache, tmp_path):
    from compllm.backends.pool import ModelPool
    from compllm.calibration import CalibrationStore, Protocol, calibrate, describe, measure_base_bytes
    from compllm.calibration.probe import HFProbe

    cfg = compose("model=smollm2-135m", "models.default.dtype=float32", "models.default.device=cpu")
    pool = ModelPool(OmegaConf.to_container(cfg.models, resolve=True), cache_dir=model_cache)
    info = describe(pool, "default")
    assert info.key == "SmolLM2-135M-Instruct|cpu|float32|weight-major" and info.facts is not None
    base = measure_base_bytes(pool)
    store = CalibrationStore(str(tmp_path))  # the calibration file goes to a fresh dir, not the model cache
    result = calibrate(pool, info, store, Protocol(**SHORT), progress=False)

    assert result.stored and result.memory_measured, result.note
    cost, params = result.cost, info.facts.params
    tokenizer = tokenizer_bytes(info.directory)  # weight_bytes = what the loaded model keeps: tensors + tokenizer
    assert abs(cost.weight_bytes - tokenizer - 4 * params) <= 0.10 * 4 * params, (cost.weight_bytes, tokenizer, params)
    assert base > 100 * 2**20  # python + torch + transformers are resident before any model
    assert 0 < cost.workspace_bytes_per_token < 1e6
    assert cost.kv_bytes_per_token == info.facts.kv_bytes_per_token("float32")  # measured on the cache = config
    assert 0 <= cost.load_extra_bytes < 0.25 * cost.weight_bytes  # the pread loader holds no second copy
    assert cost.prefill_s_per_token > 0 and set(cost.decode_step_s_by_batch) == {"1", "2"}
    assert store.get(info.key).cost == cost
    workspace, kv = HFProbe(pool.get("default")).prefill_memory(1, 64)  # measured directly, not estimated
    assert workspace > 0 and kv == cost.kv_bytes_per_token
