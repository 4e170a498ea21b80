"""`compile()`: graph + cost model + config -> Plan. Passes, then lowering; nothing else.

The input graph is never mutated (passes return new graphs), so callers may keep using it.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional

from compiler.cluster import ClusterSpec
from compiler.config import CompilerConfig, PassContext
from compiler.errors import ConfigError
from compiler.cost import CostModel
from compiler.ir import Graph
from compiler.lower import lower
from compiler.pass_manager import PassManager
from compiler.plan import Plan


@dataclass
class CompileReport:
    """Diagnostics of one compile (timings vary run to run, so they live outside the plan's JSON)."""

    pass_seconds: dict[str, float] = field(default_factory=dict)
    verify_seconds: float = 0.0
    lower_seconds: float = 0.0
    total_seconds: float = 0.0
    dumps: list[tuple[str, str]] = field(default_factory=list)  # (pass, IR text) when config.dump/dump_dir


def compile(graph: Graph, cost_model: CostModel, config: Optional[CompilerConfig] = None,  # noqa: A001
            resident: Iterable[str] = (), cluster: Optional[ClusterSpec] = None) -> Plan:
    """Verify, run the configured passes (verifying after each), lower to a Plan and verify it; `plan.report`
    has timings. `resident`: models already loaded when the plan starts (they need no load step; this process
    only). `cluster`: the nodes the `place` pass places models on (None or no nodes: this process)."""
    start = time.perf_counter()
    config = config if config is not None else CompilerConfig()
    config.validate()
    if cluster is not None and cluster.discover:
        raise ConfigError(f"cluster {cluster.name!r} says discover: true, but its nodes were never read from the "
                          f"running Ray cluster: resolve it first (compllm.cluster.resolve_cluster)")
    if cluster is not None and not cluster.is_local:
        cluster.validate()
        resident = ()  # nothing is loaded on a cluster's devices before its first plan
    ctx = PassContext.for_cost(cost_model, config, {m: 0 for m in resident if m in cost_model.models},
                               cluster=cluster)
    manager = PassManager(config.pipeline, config.disabled, config.dump_dir, dump=config.dump,
                          verify_each=config.verify)
    with _cyclic_gc_paused():
        compiled = manager.run(graph, ctx)
        lowered_at = time.perf_counter()
        plan = lower(compiled, ctx)
        lowered = time.perf_counter()
        if config.verify:
            plan.verify(cost_model)
    end = time.perf_counter()
    plan.report = CompileReport(dict(manager.timings), manager.verify_seconds + end - lowered, lowered - lowered_at,
                                end - start, list(manager.dumps))
    return plan


@contextmanager
def _cyclic_gc_paused():
    """Pause the cyclic GC while compiling: it would rescan the whole heap again and again as a compile
    allocates O(nodes) objects (superlinear at 100k nodes). Compiling makes no cycles, so refcounting
    frees everything; the previous GC state is restored even on error."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
