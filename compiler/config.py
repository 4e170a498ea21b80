"""What one compile is parameterized by: the user's `CompilerConfig` and the context passes receive.

Plain dataclasses with `typing` annotations (not PEP 604 unions), so Hydra/OmegaConf can use
`CompilerConfig` as a structured config without the compiler importing either. Choices are Enums whose member
names are what a user types (`compiler.residency=lru`), so a typo fails at compose time listing the options.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import FrozenSet, List, Mapping, Optional

from compiler.cluster import ClusterSpec, PlacementPolicy
from compiler.cost import CostModel
from compiler.errors import ConfigError

DEFAULT_PASSES = ("dedupe", "fuse", "retrieve", "batch", "prefix", "schedule", "place", "residency")


class ResidencyPolicy(str, Enum):
    """Which resident model to evict when the budget is short."""

    belady = "belady"  # the one whose next use is furthest away (known exactly: the graph is known)
    lru = "lru"  # the least recently used one (the baseline a runtime without a plan would use)


class FuseVariant(str, Enum):
    """`siblings` (b and c both reading a, in one call) is deliberately not offered; see compiler/passes/fuse.py."""

    chains = "chains"


@dataclass
class CascadeConfig:
    """A cascade (the `cascade` pass): each sub-query of `experts` (empty: every expert not already on `to_model`)
    is answered by its expert's model first, and again on `to_model` only when that draft's confidence is below
    `threshold` (0: never; above 1: always; a choice: the first-token probability margin of the best option letter; text: exp(mean token
    log-prob); both in [0, 1]). `expected_rate`: the share of parts the cost model expects to escalate (measured
    by experiments/bench_cascade.py; None: `threshold`, the rate if confidences were uniform on [0, 1]). Memory
    is planned for every escalation: both models' residency is in the plan whatever the drafts say."""

    to_model: str = "big"
    threshold: float = 0.5
    expected_rate: Optional[float] = None
    experts: List[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return min(1.0, self.threshold) if self.expected_rate is None else self.expected_rate

    def validate(self) -> None:
        if not self.threshold >= 0.0:
            raise ConfigError(f"cascade.threshold must be >= 0 (a confidence in [0, 1]; 0 never escalates, above 1 "
                              f"always), got {self.threshold!r}")
        if self.expected_rate is not None and not 0.0 <= self.expected_rate <= 1.0:
            raise ConfigError(f"cascade.expected_rate must be in [0, 1] or null, got {self.expected_rate!r}")
        if not self.to_model:
            raise ConfigError("cascade.to_model must name a model alias (e.g. big)")


@dataclass
class CompilerConfig:
    """Every compiler choice; every ablation is an override of one field."""

    passes: List[str] = field(default_factory=lambda: list(DEFAULT_PASSES))
    disabled: List[str] = field(default_factory=list)
    # Bytes the whole process may hold (runtime base + resident weights + running calls); None = unlimited.
    memory_budget: Optional[int] = None
    # Fraction of the budget kept free when planning: the planned peak of a real process is an estimate (measured
    # within a few percent of its peak, README "Memory"), so plans fit budget x (1 - headroom). 0 here (the
    # compiler's own arithmetic is exact); conf/compiler/default.yaml sets 0.05 for real runs.
    memory_headroom: float = 0.0
    max_batch_size: int = 8  # rows that decode together (live rows of one generate call)
    # Nodes one generate call may carry: beyond max_batch_size they join as rows finish (continuous refill, so
    # a long answer never decodes alone while work waits). None = max_batch_size (no refill).
    max_call_size: Optional[int] = 64
    max_batch_kv_bytes: Optional[int] = None  # optional cap on one call's KV, below what the budget allows
    residency: ResidencyPolicy = ResidencyPolicy.belady
    fuse: List[FuseVariant] = field(default_factory=list)  # empty = fuse is a no-op (answers unchanged)
    fuse_max_chain: int = 3  # longest chain fused into one call
    # On a cluster (`cluster=...` with nodes): how the `place` pass puts models on devices; ignored locally.
    placement: PlacementPolicy = PlacementPolicy.demand
    streams: int = 1  # compute streams/workers for generate steps; loads/evicts and host steps get their own
    verify: bool = True  # verify the IR after every pass (always before the first) and the plan after lowering
    dump: bool = False  # keep an IR text dump after every pass in the compile report
    dump_dir: Optional[str] = None  # also write those dumps as files there
    # The `cascade` pass's policy (None: the pass changes nothing). Set from `policy.cascade` (conf/policy/cascade.yaml).
    cascade: Optional[CascadeConfig] = None

    @property
    def pipeline(self) -> List[str]:
        """The passes to run: `passes`, with the `cascade` pass before `retrieve`/`batch` when a cascade is configured and the
        list does not place it itself (so policy=cascade needs no pass-list override)."""
        passes = list(self.passes)
        if self.cascade is not None and "cascade" not in passes:  # before what groups nodes: retrieve, batch
            at = min((passes.index(p) for p in ("retrieve", "batch") if p in passes), default=len(passes))
            passes.insert(at, "cascade")
        return passes

    @property
    def planning_budget(self) -> Optional[int]:
        """The bytes plans are fitted into: the budget less its headroom."""
        if self.memory_budget is None:
            return None
        return int(self.memory_budget * (1.0 - self.memory_headroom))

    def validate(self) -> None:
        """Field ranges (the pass pipeline itself is checked by `compiler.pass_manager.check_pipeline`)."""
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive bytes or None, got {self.memory_budget!r}")
        if not 0.0 <= self.memory_headroom < 0.5:
            raise ConfigError(f"memory_headroom must be in [0, 0.5), got {self.memory_headroom!r}")
        if self.max_batch_size < 1 or self.fuse_max_chain < 2 or self.streams < 1:
            raise ConfigError("max_batch_size and streams must be >= 1, fuse_max_chain >= 2")
        if self.max_call_size is not None and self.max_call_size < 1:
            raise ConfigError(f"max_call_size must be >= 1 or None, got {self.max_call_size!r}")
        if self.max_batch_kv_bytes is not None and self.max_batch_kv_bytes <= 0:
            raise ConfigError("max_batch_kv_bytes must be positive bytes or None")
        if self.cascade is not None:
            self.cascade.validate()
        try:
            self.residency = ResidencyPolicy(self.residency)
            self.fuse = [FuseVariant(v) for v in self.fuse]
            self.placement = PlacementPolicy(self.placement)
        except ValueError as exc:
            raise ConfigError(f"{exc}; residency: {', '.join(p.value for p in ResidencyPolicy)}; "
                              f"fuse: {', '.join(v.value for v in FuseVariant)}; "
                              f"placement: {', '.join(p.value for p in PlacementPolicy)}") from None


@dataclass
class PassContext:
    """What every pass may read: the cost model, the config, the experts the verifier accepts, the models
    resident when the plan starts (model -> bytes already reserved for it; 0 = only its weights are held, e.g.
    loaded by the planner), and the nodes earlier plan increments already answer (online compilation: passes
    leave them alone, new work may read their answers)."""

    cost: CostModel
    config: CompilerConfig = field(default_factory=CompilerConfig)
    known_experts: Optional[FrozenSet[str]] = None
    resident: Mapping[str, int] = field(default_factory=dict)
    done: FrozenSet[str] = frozenset()
    cluster: Optional[ClusterSpec] = None  # where the `place` pass puts models; None or no nodes = this process

    @classmethod
    def for_cost(cls, cost: CostModel, config: Optional[CompilerConfig] = None, resident: Mapping[str, int] = {},
                 done: FrozenSet[str] = frozenset(), cluster: Optional[ClusterSpec] = None) -> "PassContext":
        return cls(cost, config or CompilerConfig(), frozenset(cost.expert_model), dict(resident), done, cluster)
