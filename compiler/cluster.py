"""The cluster a plan is placed on (`conf/cluster/`): nodes, their devices and the memory of each device.

Pure data, so the compiler can place without knowing how the cluster is reached. `discover: true` means "read
the nodes from the running Ray cluster": that lookup lives in `compllm/cluster.py` (the compiler never talks to
Ray) and fills `nodes` before compiling. A spec with no nodes is the local process (`cluster=local`, the
default): the `place` pass then does nothing and plans are exactly what they were without a cluster.

Plain dataclasses with `typing` annotations, so Hydra uses them as the structured-config schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from compiler.errors import ConfigError


class PlacementPolicy(str, Enum):
    """How the `place` pass puts models on devices (`compiler.placement=...`)."""

    demand = "demand"  # replicas by demand (tokens per model x cost), packed and spread by estimated finish time
    round_robin = "round_robin"  # the naive baseline: model i on device i mod D, one replica each
    one_per_expert = "one_per_expert"  # one replica per model, packed by demand (no replication)


@dataclass
class NodeSpec:
    """One cluster node: `devices` accelerators (or CPU workers) of `memory_per_device` bytes each."""

    name: str = ""
    devices: int = 1
    memory_per_device: Optional[int] = None  # bytes one device may hold (weights + KV + runtime); None = unlimited
    resources: Dict[str, float] = field(default_factory=dict)  # extra Ray resources the node advertises


@dataclass
class ClusterSpec:
    """The cluster; no nodes = this process alone."""

    name: str = "local"
    nodes: List[NodeSpec] = field(default_factory=list)
    discover: bool = False  # fill `nodes` from the running Ray cluster at compile time (compllm/cluster.py)
    # Discovered nodes: bytes per device (Ray reports device counts, not accelerator memory); None = for GPU
    # nodes unlimited, for CPU-only nodes their Ray `memory` resource
    device_memory: Optional[int] = None

    @property
    def is_local(self) -> bool:
        return not self.nodes

    def devices(self) -> list["Device"]:
        """Every device, node by node, in config order (the order placement policies walk)."""
        self.validate()
        return [Device(n.name, i, n.memory_per_device) for n in self.nodes for i in range(n.devices)]

    def validate(self) -> None:
        seen: set[str] = set()
        for i, n in enumerate(self.nodes):
            if not n.name or "/" in n.name:
                raise ConfigError(f"cluster {self.name!r}: node {i} needs a name without '/', got {n.name!r}")
            if n.name in seen:
                raise ConfigError(f"cluster {self.name!r}: node name {n.name!r} is used twice")
            seen.add(n.name)
            if n.devices < 1:
                raise ConfigError(f"cluster {self.name!r}: node {n.name!r} needs devices >= 1, got {n.devices}")
            if n.memory_per_device is not None and n.memory_per_device <= 0:
                raise ConfigError(f"cluster {self.name!r}: node {n.name!r}: memory_per_device must be positive "
                                  f"bytes or null, got {n.memory_per_device!r}")


@dataclass(frozen=True)
class Device:
    """One placement target. `key` ("node/index") names it in plans and reports."""

    node: str
    index: int
    memory: Optional[int]

    @property
    def key(self) -> str:
        return device_key(self.node, self.index)


def device_key(node: str, index: int) -> str:
    """How plans name a device: "node/index"; "" is the local process."""
    return f"{node}/{index}" if node else ""


def uniform_cluster(nodes: int, devices: int, memory_per_device: Optional[int], prefix: str = "n") -> ClusterSpec:
    """`nodes` identical nodes (for simulations and tests)."""
    return ClusterSpec(f"{nodes}x{devices}", [NodeSpec(f"{prefix}{i}", devices, memory_per_device)
                                               for i in range(nodes)])
