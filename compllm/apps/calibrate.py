"""task=calibrate: measure every configured model on this machine; later compiles use the numbers."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from compllm.apps.build import build_pipeline
from compllm.costing import calibrate, calibration_key, save_calibration


def run(cfg: DictConfig, out_dir: Path, *, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """The options come from conf/task/calibrate.yaml (task.prompt_tokens=... on the command line)."""
    pipeline = build_pipeline(cfg)
    measured = {}
    for alias in pipeline.model_aliases():
        model = pipeline.pool.get(alias)
        cost = calibrate(model, prompt_tokens, new_tokens, repeats)
        measured[calibration_key(model)] = cost
        print(f"{alias} ({calibration_key(model)}): weights {cost.weight_bytes / 2**20:.0f} MiB, "
              f"KV {cost.kv_bytes_per_token / 1024:.1f} KiB/token, prefill {cost.prefill_s_per_token * 1e3:.2f} ms/token, "
              f"decode {cost.decode_s_per_token * 1e3:.1f} ms/token, load {cost.load_s:.1f} s")
    path = save_calibration(cfg.cache_dir, measured)
    payload = {key: asdict(cost) for key, cost in measured.items()}
    (out_dir / "calibration.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"calibration merged into {path}")
    return payload
