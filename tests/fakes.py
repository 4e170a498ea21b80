"""Deterministic fake backends and a real `ModelPool` that hands them out, for executor and fault tests.

The pool is compllm's own (`load`/`evict`/`resident` are the real code); only `_load` is replaced, so a plan's
load and evict steps really change what is resident."""
from __future__ import annotations

import threading
import time

from compiler import CompilerConfig, CostModel, ModelCost, compile
from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.ir import AGGREGATOR, Graph
from compllm.backends.base import BackendError, Generation, ModelStats
from compllm.backends.pool import ModelPool
from compllm.experts import Expert
from compllm.runtime.context import ExecutionContext
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.faults import RetryPolicy
from compllm.runtime.prompts import Aggregator


class EchoModel:
    """Answer = a stable function of the prompt, so any schedule must give the same answers."""

    def __init__(self, name, delay=0.0, fail_on=None):
        self.name, self.stats, self.delay, self.fail_on = name, ModelStats(), delay, fail_on
        self.batches: list[int] = []
        self.live_caps: list[int | None] = []  # max_live_rows of each call
        self.lock = threading.Lock()

    def generate(self, requests, max_live_rows=None, cancel=None, on_text=None):
        with self.lock:
            self.batches.append(len(requests))
            self.live_caps.append(max_live_rows)
        if self.delay and cancel is not None and cancel.wait(self.delay):
            raise BackendError(f"{self.name} cancelled")
        elif self.delay and cancel is None:
            time.sleep(self.delay)
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            if self.fail_on and self.fail_on in user:
                raise BackendError(f"{self.name} refuses")
            out.append(Generation(f"{self.name}:{sum(map(ord, user)) % 9973}", 10, 2, self.delay, "stop", len(requests)))
        return out


class FakePool(ModelPool):
    """compllm's ModelPool over fake backends: `models` maps each alias to the backend its load returns."""

    def __init__(self, models: dict):
        super().__init__({alias: {"source": {"path": alias}} for alias in models})
        self.models = models
        self.loads: list[str] = []
        self.evicted: list[str] = []

    def _load(self, alias):
        self.loads.append(alias)
        return self.models[alias]

    def evict(self, alias):
        self.evicted.append(alias)
        super().evict(alias)


EXPERTS = {name: Expert(name, "d", model, "sys") for name, model in
           [("general", "small"), ("math", "big"), ("medicine", "small")]}
FAST = RetryPolicy(max_attempts=3, backoff_s=0.001)
#: conf/policy/sequential.yaml's compiler settings: every node its own call (tests/test_config.py checks they agree)
SEQUENTIAL = dict(passes=["retrieve", "batch", "schedule", "residency"], max_batch_size=1, max_call_size=1)
POLICIES = {"sequential": (True, SEQUENTIAL), "level": (True, {}), "compiled": (False, {})}


def wall_query(g: Graph, final: FinalAnswer = FinalAnswer.model) -> Graph:
    """q0: a two-step `general` chain (#2 needs #1) beside an independent `math` sub-query."""
    add_query(g, "q0", "PM when the Wall fell, and 15% of 240?", [
        RoutedSubQuery(1, "In what year did the Berlin Wall fall?", (), "general", max_new_tokens=8),
        RoutedSubQuery(2, "Who was the British prime minister in #1?", (1,), "general", max_new_tokens=8),
        RoutedSubQuery(3, "What is 15% of 240?", (), "math", max_new_tokens=8),
    ], AGGREGATOR, 16, final=final)
    return g


def workload(final: FinalAnswer = FinalAnswer.model) -> Graph:
    g = wall_query(Graph(), final)
    add_query(g, "q1", "15% of 240, and scurvy?", [
        RoutedSubQuery(1, "What is 15% of 240?", (), "math", max_new_tokens=8),
        RoutedSubQuery(2, "Which vitamin prevents scurvy?", (), "medicine", max_new_tokens=8),
    ], AGGREGATOR, 16, final=final)
    return g


def cost(aggregator_model: str = "small") -> CostModel:
    mc = ModelCost(weight_bytes=1000, kv_bytes_per_token=1, prefill_s_per_token=0.001, decode_s_per_token=0.01)
    return CostModel({"small": mc, "big": mc},
                     {"general": "small", "math": "big", "medicine": "small", AGGREGATOR: aggregator_model})


def context(pool, retry: RetryPolicy | None = None, aggregator_model: str = "small",
            experts: dict | None = None) -> ExecutionContext:
    return ExecutionContext(pool, experts or EXPERTS, Aggregator(aggregator_model, "Combine."),
                            retry=retry or RetryPolicy())


def run(policy: str, graph: Graph, pool, retry: RetryPolicy | None = None, cost_model: CostModel | None = None,
        experts: dict | None = None, **config):
    """Compile `graph` as the policy does and execute it: (results by original node id, plan, executor)."""
    barrier, settings = POLICIES[policy]
    cm = cost_model or cost()
    plan = compile(graph, cm, CompilerConfig(**{**settings, **config}), resident=pool.loaded())
    executor = PlanExecutor(policy, barrier=barrier)
    aggregator_model = cm.expert_model[AGGREGATOR]
    return executor.run(plan, context(pool, retry, aggregator_model, experts), graph), plan, executor
