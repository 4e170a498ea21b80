"""Cross-group checks Hydra's schemas cannot express, run right after composing and before any model loads."""
from __future__ import annotations

from typing import Any

from compllm.backends.hf import DECODE_MATMULS, DTYPES
from compllm.runtime.context import AGGREGATOR


class ConfigError(ValueError):
    """The composed config is inconsistent; the message lists every problem with its fix."""


def check_config(cfg: Any) -> None:
    problems: list[str] = []
    models = set(cfg.models)
    if not models:
        problems.append("no models configured: pick one with `model=qwen2.5-coder-0.5b` (or smollm2-135m, hf)")
    for alias, spec in cfg.models.items():
        if spec.dtype not in DTYPES:
            problems.append(f"models.{alias}.dtype={spec.dtype!r}: use one of {', '.join(DTYPES)}")
        if not (spec.device in ("auto", "cpu") or str(spec.device).startswith("cuda")):
            problems.append(f"models.{alias}.device={spec.device!r}: use auto, cpu, cuda or cuda:N")
        if spec.decode_matmul not in DECODE_MATMULS:
            problems.append(f"models.{alias}.decode_matmul={spec.decode_matmul!r}: use one of {', '.join(DECODE_MATMULS)}")

    def need_model(where: str, alias: str) -> None:
        if alias not in models:
            problems.append(f"{where}={alias!r} names no configured model; configured: {', '.join(sorted(models))}")

    if not cfg.experts:
        problems.append("no experts configured: pick a set with `experts=default`")
    if AGGREGATOR in cfg.experts:
        problems.append(f"expert name {AGGREGATOR!r} is reserved for the aggregator; rename that expert")
    for name, expert in cfg.experts.items():
        need_model(f"experts.{name}.model", expert.model)
    need_model("decomposer.model", cfg.decomposer.model)
    need_model("aggregator.model", cfg.aggregator.model)
    fallback = cfg.router.get("fallback_expert")
    if fallback is not None and fallback not in cfg.experts:
        problems.append(
            f"router.fallback_expert={fallback!r} is not an expert; configured experts: {', '.join(cfg.experts)}"
        )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
