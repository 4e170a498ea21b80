"""Structured-config schemas: Hydra validates every group against these at compose time.

A misspelt key, a wrong type or a value outside an Enum fails before any model loads, with Hydra naming the key
and listing the valid values. One dataclass per concept: where compllm has a runtime dataclass for a concept
(`CompilerConfig`, `ClusterSpec`, `Expert`, `Aggregator`, `RetryPolicy`, `FaultSettings`) it *is* the schema, and the app
builds the object from the config with `OmegaConf.to_object`; groups that name a class to build (`_target_`:
decomposer, router, policy, model sources, benchmark loaders, systems) get a schema of their own here.
Registered in Hydra's ConfigStore as `compllm_schema`, the base of `conf/config.yaml`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from compiler.cluster import ClusterSpec
from compiler.config import CascadeConfig, CompilerConfig
from compllm.backends.faulty import FaultSettings
from compllm.backends.llamacpp import LlamaCppSettings
from compllm.backends.openai_server import ServerConfig
from compllm.experts import Expert
from compllm.runtime.faults import RetryPolicy
from compllm.runtime.prompts import Aggregator
from compllm.runtime.ray_executor import RayClusterConfig
from compllm.serve.config import ServeConfig


class Backend(str, Enum):
    hf = "hf"  # transformers, in process
    openai = "openai"  # any OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server, Ollama)
    llamacpp = "llamacpp"  # llama.cpp in process (llama-cpp-python), running the source's GGUF as is


class Dtype(str, Enum):
    auto = "auto"  # bf16 on GPUs and bf16-capable CPUs, else fp32
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class DecodeMatmul(str, Enum):
    auto = "auto"  # weight-major matmul for decode-sized inputs on CPU
    torch = "torch"  # nn.Linear as is


@dataclass
class ModelConfig:
    name: str = MISSING  # display name, e.g. the HF model name
    backend: Backend = Backend.hf
    # backend=hf: a `_target_` source of weights (compllm.models.HFSource / GGUFSource / EmbeddedSource);
    # backend=llamacpp: a GGUFSource or EmbeddedSource (its GGUF file is loaded as is, no conversion)
    source: Any = None
    # backend=openai: where the model is served and what the server supports
    server: Optional[ServerConfig] = None
    dtype: Dtype = Dtype.auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked with the rest of the config: N is free)
    decode_matmul: DecodeMatmul = DecodeMatmul.auto
    fault_injection: FaultSettings = field(default_factory=FaultSettings)
    # backend=llamacpp: threads, context size, sequences, prefix cache, KV layout (dtype/device/decode_matmul unused)
    llamacpp: LlamaCppSettings = field(default_factory=LlamaCppSettings)


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
    stream: bool = True  # read the planner while it writes: each complete part joins the running plan at once
    constrained: bool = False  # decode under the plan JSON schema (a DAG by construction) where the backend can
    max_question_chars: int = 160  # per sub-query under the schema
    fanoutqa_exemplars: List[str] = field(default_factory=list)  # FanOutQA dev ids appended as worked examples


@dataclass
class RouterConfig:
    _target_: str = "compllm.frontend.router.EmbeddingRouter"
    embedding_model: Any = MISSING  # a `_target_` source of a sentence-transformers directory
    threshold: float = 0.2
    fallback_expert: str = "general"
    device: str = "cpu"
    batch_size: int = 64


@dataclass
class PolicyConfig:
    _target_: str = "compllm.runtime.executor.PlanExecutor"
    name: str = MISSING
    barrier: bool = False  # run plan steps one at a time in plan order (the `level` and `sequential` policies)
    # conf/policy/cascade.yaml: the compiler plans a cascade (small model first, escalation on low confidence);
    # build_pipeline hands it to the compiler (`CompilerConfig.cascade`), the executor only evaluates its guards.
    cascade: Optional[CascadeConfig] = None


class ClusterExecutor(str, Enum):
    local = "local"  # every step in this process
    ray = "ray"  # placed steps on Ray actors (compllm/runtime/ray_executor.py)


@dataclass
class ClusterConfig(ClusterSpec):
    """conf/cluster/: what the `place` pass places on (the compiler's `ClusterSpec`: nodes, devices, memory) and
    what runs the placed plan: `executor` (local, or Ray actors with the `ray` settings, their own schema)."""

    executor: ClusterExecutor = ClusterExecutor.local
    ray: RayClusterConfig = field(default_factory=RayClusterConfig)


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


@dataclass
class ServeTaskConfig(TaskConfig):
    """task=serve: its options are the `serve:` node (conf/serve/default.yaml)."""


# One schema per task option, stored as `task/<name>_schema`: each conf/task/<name>.yaml lists it in its defaults,
# so a key another task owns (task.limit under task=query) fails at compose time, naming the schema.
TASK_SCHEMAS: Dict[str, type] = {"query": QueryTaskConfig, "explain": ExplainTaskConfig,
                                 "calibrate": CalibrateTaskConfig, "bench": BenchTaskConfig,
                                 "serve": ServeTaskConfig}


@dataclass
class CompllmConfig:
    models: Dict[str, ModelConfig] = field(default_factory=dict)
    experts: Dict[str, Expert] = field(default_factory=dict)
    decomposer: DecomposerConfig = field(default_factory=DecomposerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    aggregator: Aggregator = field(default_factory=Aggregator)
    compiler: CompilerConfig = field(default_factory=CompilerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # conf/cluster/: local (default), ray, h100_8x8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    task: TaskConfig = field(default_factory=TaskConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # task=serve: the HTTP server (conf/serve/)
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
