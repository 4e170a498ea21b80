"""Cross-group checks Hydra's schemas cannot express, run right after composing and before any model loads.

Every problem is one line that says what is wrong and how to fix it; all problems are reported at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compiler.errors import CompileError, ConfigError
from compiler.ir import AGGREGATOR
from compiler.pass_manager import check_pipeline
from compllm.backends.faulty import FaultSettings
from compllm.config.models import source_problems, weight_bytes_lower_bound

__all__ = ["ConfigError", "check_config"]


def check_config(cfg: Any) -> None:
    """Raise ConfigError (only) listing every problem; a value that cannot even be read is one too."""
    try:
        _check(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a value"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"invalid config: {key} cannot be read ({first}); set it on the command line") from None


def _check(cfg: Any) -> None:
    problems: list[str] = []
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException:  # an interpolation to a missing value (model=hf): named per model below
        missing = []
    problems += [f"{key} is not set (???); set it on the command line: {key}=..." for key in missing
                 if not key.startswith("models.")]
    models = set(cfg.models)
    if not models:
        problems.append("no models configured: pick one with `model=qwen2.5-coder-0.5b` (or smollm2-135m, hf)")
    for alias, spec in cfg.models.items():  # dtype, backend, decode_matmul: Enums, checked at compose time
        if not (spec.device in ("auto", "cpu") or str(spec.device).startswith("cuda")):
            problems.append(f"models.{alias}.device={spec.device!r}: use auto, cpu, cuda or cuda:N")
        faults = spec.get("fault_injection")
        if faults is not None:
            problems += [f"models.{alias}.fault_injection.{p}" for p in FaultSettings(**faults).problems()]

    def need_model(where: str, alias: str) -> None:
        if alias not in models:
            problems.append(f"{where}={alias!r} names no configured model; configured: {', '.join(sorted(models))}")

    if not cfg.experts:
        problems.append("no experts configured: pick a set with `experts=default`")
    if AGGREGATOR in cfg.experts:
        problems.append(f"expert name {AGGREGATOR!r} is reserved for the aggregator; rename that expert")
    for name, expert in cfg.experts.items():
        need_model(f"experts.{name}.model", expert.model)
        if expert.get("knowledge") is not None:
            problems += _knowledge_problems(name, expert.knowledge)
    need_model("decomposer.model", cfg.decomposer.model)
    need_model("aggregator.model", cfg.aggregator.model)
    fallback = cfg.router.get("fallback_expert")
    if fallback is not None and fallback not in cfg.experts:
        problems.append(
            f"router.fallback_expert={fallback!r} is not an expert; configured experts: {', '.join(cfg.experts)}"
        )
    cascade = cfg.policy.get("cascade")
    if cascade is not None:
        if cascade.to_model not in models:
            problems.append(f"policy.cascade.to_model={cascade.to_model!r} names no configured model; add the big "
                            f"model, e.g. +model@models.{cascade.to_model}=qwen2.5-coder-1.5b-llamacpp "
                            f"(configured: {', '.join(sorted(models))})")
        problems += [f"policy.cascade.experts names {name!r}, which is not an expert; configured experts: "
                     f"{', '.join(cfg.experts)}" for name in cascade.experts if name not in cfg.experts]
        if cascade.threshold < 0:
            problems.append(f"policy.cascade.threshold={cascade.threshold!r} must be >= 0 (a confidence in [0, 1]; "
                            "0 never escalates, above 1 always)")
        if cascade.expected_rate is not None and not 0.0 <= cascade.expected_rate <= 1.0:
            problems.append(f"policy.cascade.expected_rate={cascade.expected_rate!r} must be in [0, 1] (a share)")
    problems += _limit_problems(cfg) + _path_problems(cfg) + _compiler_problems(cfg)
    if not problems:  # weights are only looked for once the config itself is sound
        problems += _weights_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _knowledge_problems(name: str, knowledge: Any) -> list[str]:
    """What is wrong with an expert's knowledge source, found before any index is built."""
    from compllm.knowledge.config import KnowledgeConfig
    from compllm.knowledge.corpus import KnowledgeError
    from compllm.knowledge.retriever import check

    cfg = KnowledgeConfig(str(knowledge.corpus), list(knowledge.topics), int(knowledge.k),
                          int(knowledge.max_passage_chars))
    problems = []
    try:
        check(name, cfg)
    except KnowledgeError as exc:
        problems.append(str(exc))
    if cfg.corpus != "wiki" and not Path(cfg.corpus).expanduser().is_dir():
        problems.append(f"experts.{name}.knowledge.corpus={cfg.corpus!r} is neither `wiki` nor a directory")
    return problems


def _limit_problems(cfg: Any) -> list[str]:
    """Caps that bound prompts and graphs, and the retry policy: each must be usable."""
    problems = []
    for key in ("decomposer.max_subqueries", "decomposer.max_chars", "decomposer.max_query_chars",
                "decomposer.max_new_tokens", "aggregator.max_answer_chars", "aggregator.max_new_tokens",
                "max_answer_chars", "retry.max_attempts"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            problems.append(f"{key}={value!r} must be at least 1")
    retry = cfg.get("retry")
    if retry is not None:
        if retry.backoff_s < 0:
            problems.append(f"retry.backoff_s={retry.backoff_s!r} must be >= 0 seconds")
        if retry.timeout_s is not None and retry.timeout_s <= 0:
            problems.append(f"retry.timeout_s={retry.timeout_s!r} must be > 0 seconds, or null for no limit")
    return problems


def _path_problems(cfg: Any) -> list[str]:
    """Paths from the config, resolved, so the message shows exactly which file or directory is meant."""
    problems = []
    if cfg.get("queries_file"):
        path = Path(str(cfg.queries_file)).expanduser().resolve()
        if not path.is_file():
            problems.append(f"queries_file={str(path)!r} is not a file; give a text file with one query per line")
    if cfg.get("cache_dir"):
        path = Path(str(cfg.cache_dir)).expanduser().resolve()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if path.exists() and not path.is_dir():
            problems.append(f"cache_dir={str(path)!r} is a file, not a directory; point it at a directory")
        elif existing is not None and not existing.is_dir():
            problems.append(f"cache_dir={str(path)!r} cannot be created: {str(existing)!r} is a file")
    return problems


def _compiler_problems(cfg: Any) -> list[str]:
    """The compiler config's ranges and its pass pipeline's contracts, before anything loads."""
    try:
        config = OmegaConf.to_object(cfg.compiler)
        config.validate()
        check_pipeline(config.pipeline, config.disabled)
    except CompileError as exc:
        return [f"compiler: {exc}"]
    return []


def _used_models(cfg: Any) -> list[str]:
    return list(dict.fromkeys([cfg.decomposer.model, cfg.aggregator.model, *(e.model for e in cfg.experts.values())]))


def _weights_problems(cfg: Any) -> list[str]:
    """Can every used model's weights be found, and does each fit the memory budget on its own?"""
    problems = []
    budget = OmegaConf.select(cfg, "compiler.memory_budget")
    for alias in _used_models(cfg):
        try:
            spec = OmegaConf.to_container(cfg.models[alias], resolve=True, throw_on_missing=True, enum_to_str=True)
        except OmegaConfBaseException as exc:
            node = cfg.models[alias]
            part = "server" if node.get("backend") == "openai" else "source"
            group = node.get(part) or {}
            missing = [f"{part}.{k}" for k in group if OmegaConf.is_missing(group, k)]
            what = f"models.{alias}.{missing[0]} is not set" if missing else f"models.{alias}: {exc}"
            problems.append(f"{what}; set it on the command line, e.g. models.{alias}.{missing[0] if missing else part}=...")
            continue
        if spec.get("backend") == "openai":  # served elsewhere: no weights here, no local memory
            if not spec.get("server"):
                problems.append(f"models.{alias}.backend=openai needs models.{alias}.server "
                                "(base_url and model; see conf/model/vllm.yaml)")
            continue
        if not spec.get("source"):
            problems.append(f"models.{alias}.source is not set: name the weights (see conf/model/*.yaml)")
            continue
        problems += source_problems(alias, spec, cfg.get("cache_dir"))
        if budget is not None:  # weights take their compute dtype's bytes: resolve `auto` as the loader will
            spec["dtype"] = _compute_dtype(spec)
        bound = weight_bytes_lower_bound(spec, cfg.get("cache_dir")) if budget is not None else None
        if bound is not None and bound[0] > budget:
            need, how = bound
            problems.append(
                f"compiler.memory_budget={budget:,} bytes ({budget / 2**30:.2f} GiB) cannot hold models.{alias} "
                f"({spec.get('name')}): its weights alone take at least {need:,} bytes ({how}); raise it, e.g. "
                f"compiler.memory_budget=${{gib:{-(-need // 2**30)}}}, or pick a smaller model")
    return problems


def _compute_dtype(spec: dict) -> str:
    from compllm.backends.base import BackendError
    from compllm.backends.hf import resolve_device, resolve_dtype

    try:  # imports torch: only when a budget must be checked against the weights' real size
        return resolve_dtype(str(spec.get("dtype", "auto")), resolve_device(str(spec.get("device", "auto"))))
    except BackendError:
        return str(spec.get("dtype", "auto"))
