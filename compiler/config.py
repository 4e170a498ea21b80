"""What one compile is parameterized by: the user's `CompilerConfig` and the context passes receive.

Plain dataclasses with `typing` annotations (not PEP 604 unions), so Hydra/OmegaConf can use
`CompilerConfig` as a structured config without the compiler importing either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional

from compiler.cost import CostModel
from compiler.errors import ConfigError

DEFAULT_PASSES = ("dedupe", "fuse", "batch", "level_schedule")
EVICTION_POLICIES = ("belady", "lru")
FUSE_VARIANTS = ("chains",)  # "siblings" is deliberately not implemented; see compiler/passes/fuse.py


@dataclass
class CompilerConfig:
    """Every compiler choice; every ablation is an override of one field."""

    passes: List[str] = field(default_factory=lambda: list(DEFAULT_PASSES))
    disabled: List[str] = field(default_factory=list)
    memory_budget: Optional[int] = None  # bytes for weights + KV on the device; None = unlimited
    max_batch_size: int = 8  # rows that decode together (live rows of one generate call)
    # Nodes one generate call may carry: beyond max_batch_size they join as rows finish (continuous refill, so
    # a long answer never decodes alone while work waits). None = max_batch_size (no refill).
    max_call_size: Optional[int] = 64
    max_batch_kv_bytes: Optional[int] = None  # optional cap on one batch's KV, below what the budget allows
    eviction: str = "belady"  # belady (next use known from the graph) | lru (baseline for comparison)
    fuse: List[str] = field(default_factory=list)  # fuse variants; empty = fuse is a no-op (answers unchanged)
    fuse_max_chain: int = 3  # longest chain fused into one call
    streams: int = 1  # compute streams/workers for generate steps; loads/evicts use one more (index `streams`)
    verify: bool = True  # verify the IR after every pass (always before the first)
    dump: bool = False  # keep an IR text dump after every pass in the compile report
    dump_dir: Optional[str] = None  # also write those dumps as files there

    def validate(self) -> None:
        from compiler.passes import REGISTRY  # late: the registry imports the passes, which import this module

        unknown = [p for p in (*self.passes, *self.disabled) if p not in REGISTRY]
        if unknown:
            raise ConfigError(f"unknown compiler pass(es) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(REGISTRY))}")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        for variant in self.fuse:
            if variant == "siblings":
                raise ConfigError("fuse variant 'siblings' is not implemented: children would need a reference to "
                                  "one part of a fused answer, which the IR cannot express yet; use 'chains'")
            if variant not in FUSE_VARIANTS:
                raise ConfigError(f"unknown fuse variant {variant!r}; known: {', '.join(FUSE_VARIANTS)}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive bytes or None, got {self.memory_budget!r}")
        if self.max_batch_size < 1 or self.fuse_max_chain < 2 or self.streams < 1:
            raise ConfigError("max_batch_size and streams must be >= 1, fuse_max_chain >= 2")
        if self.max_call_size is not None and self.max_call_size < 1:
            raise ConfigError(f"max_call_size must be >= 1 or None, got {self.max_call_size!r}")
        if self.max_batch_kv_bytes is not None and self.max_batch_kv_bytes <= 0:
            raise ConfigError("max_batch_kv_bytes must be positive bytes or None")


@dataclass
class PassContext:
    """What every pass may read: the cost model, the config, and the experts the verifier accepts."""

    cost: CostModel
    config: CompilerConfig = field(default_factory=CompilerConfig)
    known_experts: Optional[FrozenSet[str]] = None

    @classmethod
    def for_cost(cls, cost: CostModel, config: Optional[CompilerConfig] = None) -> "PassContext":
        return cls(cost, config or CompilerConfig(), frozenset(cost.expert_model))
