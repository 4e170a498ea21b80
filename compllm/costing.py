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
    return f"{model.name}|{model.device.split(':')[0]}|{model.dtype}"


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


def build_cost_model(pool, experts: Mapping, aggregator_model: str, cache_dir: str | None = None,
                     aggregator_expert: str = "aggregator") -> CostModel:
    """A CostModel over every alias the experts and aggregator use (loads those models if needed)."""
    calibration = load_calibration(cache_dir)
    expert_model = {name: e.model for name, e in experts.items()}
    expert_model[aggregator_expert] = aggregator_model
    models = {}
    for alias in dict.fromkeys(expert_model.values()):
        model = pool.get(alias)
        measured = calibration.get(calibration_key(model))
        models[alias] = ModelCost(**measured) if measured else roofline_cost(model)
    return CostModel(models=models, expert_model=expert_model)


def calibrate(model, prompt_tokens: int = 256, new_tokens: int = 32, repeats: int = 3) -> ModelCost:
    """Measure prefill and decode seconds per token at batch 1 (medians over `repeats`)."""
    import statistics

    import torch

    ids = torch.full((1, prompt_tokens), model.tokenizer.pad_token_id or 0, dtype=torch.long, device=model.device)
    ids[0, 0] = model.tokenizer.bos_token_id or ids[0, 0]
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up kernels and allocators
            start = time.perf_counter()
            model.model(input_ids=ids)
            p = time.perf_counter() - start
            start = time.perf_counter()
            model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=model.tokenizer.pad_token_id)
            g = time.perf_counter() - start
            prefill.append(p / prompt_tokens)
            decode.append(max(g - p, 0.0) / new_tokens)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.model.parameters())
    return ModelCost(
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model),
        prefill_s_per_token=statistics.median(prefill[1:]),
        decode_s_per_token=statistics.median(decode[1:]),
        load_s=model.stats.load_seconds,
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
