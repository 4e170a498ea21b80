"""Structured-config schemas: Hydra validates every group against these at compose time.

A misspelt key or a wrong type fails before any model loads, with Hydra naming the key.
Registered in Hydra's ConfigStore as `compllm_schema`, the base of `conf/config.yaml`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from compiler.config import CompilerConfig


@dataclass
class FaultInjectionConfig:
    """Chaos testing (compllm/backends/faulty.py): off by default; rates in [0, 1], per call / per request."""

    enabled: bool = False
    seed: int = 0
    error_rate: float = 0.0  # per call: raise a BackendError
    oom_rate: float = 0.0  # per call: raise a MemoryError like a device out of memory
    hang_rate: float = 0.0  # per call: stall hang_s seconds (past retry.timeout_s) before answering
    empty_rate: float = 0.0  # per request: return empty text (a failed attempt; retried)
    hang_s: float = 30.0


@dataclass
class ModelConfig:
    name: str = MISSING  # display name, e.g. the HF model name
    source: Any = MISSING  # a `_target_` source: compllm.models.HFSource / GGUFSource / EmbeddedSource
    backend: str = "hf"
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 where the hardware has it)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    decode_matmul: str = "auto"  # auto: weight-major matmul for decode-sized inputs on CPU | torch: nn.Linear as is
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)


@dataclass
class ExpertConfig:
    description: str = MISSING
    system_prompt: str = MISSING
    model: str = "default"  # alias into `models`
    exemplars: List[str] = field(default_factory=list)
    max_new_tokens: int = 96
    stop: List[str] = field(default_factory=list)


@dataclass
class DecomposerExample:
    query: str = MISSING
    subqueries: List[Any] = MISSING  # [{question, depends_on}]


@dataclass
class DecomposerConfig:
    _target_: str = "compllm.frontend.decomposer.Decomposer"
    model: str = "default"
    system_prompt: str = MISSING
    examples: List[DecomposerExample] = field(default_factory=list)
    max_subqueries: int = 8
    max_chars: int = 1000
    max_new_tokens: int = 256
    max_query_chars: int = 4000
    split_enumerated: bool = True  # numbered questions are split at their numbers, no model call
    detect_choices: bool = True  # their questions with lettered options are typed `choice` (scored, not generated)


@dataclass
class RouterConfig:
    _target_: str = "compllm.frontend.router.EmbeddingRouter"
    embedding_model: Any = MISSING  # a `_target_` source of a sentence-transformers directory
    threshold: float = 0.2
    fallback_expert: str = "general"
    device: str = "cpu"
    batch_size: int = 64


@dataclass
class AggregatorConfig:
    _target_: str = "compllm.runtime.prompts.Aggregator"
    model: str = "default"
    system_prompt: str = MISSING
    max_new_tokens: int = 160
    max_answer_chars: int = 600
    skip_single: bool = True
    list_enumerated: bool = True  # numbered questions (decomposer.split_enumerated) get a numbered list of answers
    stop: List[str] = field(default_factory=list)


@dataclass
class PolicyConfig:
    _target_: str = MISSING
    name: str = MISSING
    barrier: Optional[bool] = None  # PlanExecutor only: run plan steps one at a time (the `level` policy)


@dataclass
class RetryConfig:
    """Per model call: attempts (1 = no retry), exponential backoff, and a wall-clock limit per attempt."""

    max_attempts: int = 2
    backoff_s: float = 0.5
    timeout_s: Optional[float] = None


@dataclass
class TaskConfig:
    """What the app does (conf/task/*.yaml): a `_target_` function that main instantiates as a partial and calls as
    `run(cfg, out_dir)`; every other key of the option is one of that function's keyword arguments."""

    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class QueryTaskConfig(TaskConfig):
    """task=query: no options of its own (the query comes from `query` / `queries_file`)."""


@dataclass
class ExplainTaskConfig(TaskConfig):
    """task=explain: no options of its own."""


@dataclass
class CalibrateTaskConfig(TaskConfig):
    prompt_tokens: int = 256  # prompt length the prefill is timed on
    new_tokens: int = 32  # tokens decoded per timed round
    repeats: int = 3  # timed rounds after a warm-up; each number is the minimum over them


@dataclass
class BenchTaskConfig(TaskConfig):
    limit: Optional[int] = None  # the first N items
    chunk_size: int = 8  # items compiled and run together


# One schema per task option, stored as `task/<name>_schema`: each conf/task/<name>.yaml lists it in its defaults,
# so a key another task owns (task.limit under task=query) fails at compose time, naming the schema.
TASK_SCHEMAS: Dict[str, type] = {"query": QueryTaskConfig, "explain": ExplainTaskConfig,
                                 "calibrate": CalibrateTaskConfig, "bench": BenchTaskConfig}


@dataclass
class CompllmConfig:
    models: Dict[str, ModelConfig] = field(default_factory=dict)
    experts: Dict[str, ExpertConfig] = field(default_factory=dict)
    decomposer: DecomposerConfig = field(default_factory=DecomposerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    compiler: CompilerConfig = field(default_factory=CompilerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    benchmark: Optional[Dict[str, Any]] = None  # task=bench: {name, loader: a `_target_` returning BenchItems}
    system: Optional[Dict[str, Any]] = None  # task=bench: a `_target_` system (compllm/bench/systems.py)
    experiment_name: Optional[str] = None  # set by conf/experiment/*: names the sweep dir
    query: Optional[str] = None  # one query, or
    queries_file: Optional[str] = None  # a text file with one query per line
    cache_dir: Optional[str] = None  # model cache; default $COMPLLM_CACHE or $XDG_CACHE_HOME/compllm
    max_answer_chars: int = 400  # cap on a parent answer quoted into a dependent prompt
    show_progress: bool = True
    auto_calibrate: bool = True  # measure a model's costs once per machine before compiling for it


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="compllm_schema", node=CompllmConfig)
    for name, schema in TASK_SCHEMAS.items():
        cs.store(group="task", name=f"{name}_schema", node=schema)
    # `compiler.memory_budget=${gib:4}`: budgets in GiB on the command line, bytes in the config.
    OmegaConf.register_new_resolver("gib", lambda n: int(float(n) * 2**30), replace=True)
    # Run and sweep dirs (conf/config.yaml): the process id next to the second makes two runs started in the same
    # second on one machine write into different dirs. Cached: every use in this process gets the same value.
    OmegaConf.register_new_resolver("compllm.pid", lambda: str(os.getpid()), use_cache=True, replace=True)
