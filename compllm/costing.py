"""The compiler's cost model for the configured models: measured (calibration) where we have it, roofline else.

Calibration numbers are keyed by model name, device and dtype, and live in `<cache>/calibration.json`,
written by `compllm task=calibrate`; every later compile on that machine picks them up.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

from compiler.cost import CostModel, ModelCost
from compllm.models.cache import atomic_write_text, cache_root

log = logging.getLogger(__name__)

# Roofline defaults when nothing was measured: conservative for a small CPU box, ~H100-class for CUDA.
HARDWARE = {
    "cpu": {"mem_bandwidth_Bps": 10e9, "flops": 1e11},
    "cuda": {"mem_bandwidth_Bps": 2.0e12, "flops": 4e14},
}


def calibration_path(cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "calibration.json"


def calibration_key(model) -> str:
    """Timings hold for one model on one device kind, dtype and decode kernel (a changed kernel re-measures)."""
    kernel = "weight-major" if getattr(model, "skinny_linears", 0) else "torch"
    return f"{model.name}|{model.device.split(':')[0]}|{model.dtype}|{kernel}"


def load_calibration(cache_dir: str | None) -> dict:
    path = calibration_path(cache_dir)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable calibration file %s (%s); using roofline estimates", path, exc)
        return {}


def model_shape(model) -> dict:
    cfg = model.model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


def kv_bytes_per_token(model) -> int:
    s = model_shape(model)
    elem = next(model.model.parameters()).element_size()
    return 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * elem


def roofline_cost(model) -> ModelCost:
    params = sum(p.numel() for p in model.model.parameters())
    elem = next(model.model.parameters()).element_size()
    hw = HARDWARE["cuda" if model.device.startswith("cuda") else "cpu"]
    s = model_shape(model)
    return ModelCost.roofline(params, elem, s["layers"], s["kv_heads"], s["head_dim"], hw["mem_bandwidth_Bps"],
                              hw["flops"], kv_bytes_per_elem=elem)


def build_cost_model(pool, expert_model: Mapping[str, str], planner_model: str, cache_dir: str | None = None,
                     auto_calibrate: bool = False) -> CostModel:
    """A CostModel over every alias the experts and aggregator use (loads those models if needed).

    With `auto_calibrate`, a model never measured on this machine is calibrated once (tens of seconds) and
    saved, so the batch pass decides with this hardware's real batch-size curve rather than a formula.
    """
    calibration = load_calibration(cache_dir)
    if auto_calibrate:
        missing = {}
        for alias in dict.fromkeys([*expert_model.values(), planner_model]):
            model = pool.get(alias)
            key = calibration_key(model)
            if key not in calibration and key not in missing:
                log.info("calibrating %s on this machine, once (compiler.auto_calibrate)", key)
                missing[key] = calibrate(model, prompt_tokens=64, new_tokens=4, repeats=3)
        if missing:
            save_calibration(cache_dir, missing)
            calibration = load_calibration(cache_dir)
    models = {}
    for alias in dict.fromkeys([*expert_model.values(), planner_model]):
        model = pool.get(alias)
        measured = calibration.get(calibration_key(model))
        models[alias] = ModelCost(**measured) if measured else roofline_cost(model)
    return CostModel(models=models, expert_model=dict(expert_model))


BATCH_SIZES = (1, 2, 3, 4, 6, 8)


def _time_generate(model, ids, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds of `new_tokens` decode steps) for one batch of prompts `ids`, both timed
    directly on the backend's own prefill and decode step (weight-major kernel included).

    Not "generate minus a separate prefill": that difference of two noisy timings went negative on a
    bf16 model whose prefill dominates, and the minimum over rounds then kept a decode step of 0 s."""
    import torch

    start = time.perf_counter()
    batch = model.prefill_ids(ids, torch.ones_like(ids), range(ids.shape[0]))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        batch.step(model, batch.logits.argmax(-1))
    return prefill, time.perf_counter() - start


def calibrate(model, prompt_tokens: int = 256, new_tokens: int = 32, repeats: int = 3,
              batch_sizes: tuple[int, ...] = BATCH_SIZES) -> ModelCost:
    """Measure prefill and decode seconds per token at batch 1, and the decode step at each batch size.

    Each number is the minimum over `repeats` rounds (after one warm-up round), each round visiting every
    batch size: other work on the machine only ever adds time, and a median of few samples taken on a busy
    machine once made batch 2 look 7x slower than batch 1, which made the batch pass split every batch.
    """
    import torch

    token = model.tokenizer.bos_token_id or model.tokenizer.eos_token_id or 0

    def ids(batch: int, length: int):
        return torch.full((batch, length), token, dtype=torch.long, device=model.device)

    prefill, decode = [], []
    steps: dict[str, list[float]] = {str(b): [] for b in batch_sizes}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up kernels and allocators
            p, d = _time_generate(model, ids(1, prompt_tokens), new_tokens)
            if round_:
                prefill.append(p / prompt_tokens)
                decode.append(d / new_tokens)
            for b in batch_sizes:  # short prompts: the batch curve is about the decode-step kernels
                _, d = _time_generate(model, ids(b, 16), new_tokens)
                if round_:
                    steps[str(b)].append(d / new_tokens)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.model.parameters())
    return ModelCost(
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model),
        prefill_s_per_token=min(prefill),
        decode_s_per_token=min(decode),
        load_s=model.stats.load_seconds,
        decode_step_s_by_batch={b: min(v) for b, v in steps.items()},
    )


def save_calibration(cache_dir: str | None, entries: Mapping[str, ModelCost]) -> Path:
    """Merge measured costs into the calibration file (atomically: a killed run never leaves it half-written)."""
    from dataclasses import asdict

    data = load_calibration(cache_dir)
    data.update({key: asdict(cost) for key, cost in entries.items()})
    path = calibration_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    return path
