"""`discover: true`: read the cluster spec's nodes from the running Ray cluster, before each compile.

Lives here, not in `compiler/`: the compiler places on a `ClusterSpec` and never talks to Ray. Ray is optional
(the `ray` extra); it is imported only when a spec asks for discovery. A node's name is its custom resource (the
convention the Ray executor pins actors with: `ray start --resources '{"n1": 1}'`), else its node id; its
devices are its GPUs (1 for a CPU-only node); memory per device is the spec's `device_memory`, or for a CPU-only
node its Ray `memory` resource (Ray reports no accelerator memory).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

from compiler.cluster import ClusterSpec, NodeSpec
from compiler.errors import ConfigError

#: Resources every Ray node reports; anything else is a custom resource (a node name, or one a user added).
_STANDARD = ("CPU", "GPU", "memory", "object_store_memory")
_STANDARD_PREFIXES = ("node:", "accelerator_type:")


def resolve_cluster(spec: Optional[ClusterSpec], ray_nodes: Optional[Iterable[Mapping[str, Any]]] = None,
                    ) -> Optional[ClusterSpec]:
    """The spec to compile for: None for the local process, the spec itself when its nodes are listed, and for
    `discover: true` a copy with the nodes of the running Ray cluster (`ray.nodes()`, or `ray_nodes`)."""
    if spec is None or (spec.is_local and not spec.discover):
        return None
    if not spec.discover:
        spec.validate()
        return spec
    if ray_nodes is None:
        ray_nodes = _ray_nodes(spec)
    nodes = [node_spec(n, spec.device_memory) for n in ray_nodes if n.get("Alive", True)]
    if not nodes:
        raise ConfigError(f"cluster {spec.name!r}: the running Ray cluster has no alive nodes")
    out = dataclasses.replace(spec, nodes=sorted(nodes, key=lambda n: n.name), discover=False)
    out.validate()
    return out


def node_spec(node: Mapping[str, Any], device_memory: Optional[int] = None) -> NodeSpec:
    """One entry of `ray.nodes()` as a NodeSpec."""
    resources = dict(node.get("Resources", {}))
    custom = sorted(k for k in resources if k not in _STANDARD and not k.startswith(_STANDARD_PREFIXES))
    name = custom[0] if custom else str(node.get("NodeID", ""))[:12]
    gpus = int(resources.get("GPU", 0))
    memory = device_memory
    if memory is None and not gpus and resources.get("memory"):
        memory = int(resources["memory"])
    return NodeSpec(name=name, devices=max(1, gpus), memory_per_device=memory,
                    resources={k: float(resources[k]) for k in custom})


def _ray_nodes(spec: ClusterSpec) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"cluster {spec.name!r} says discover: true, which reads the running Ray cluster, but "
                          f"ray is not installed: `make setup-ray` (the `ray` extra), or list the nodes in "
                          f"conf/cluster/ (discover: false)") from None
    if not ray.is_initialized():
        raise ConfigError(f"cluster {spec.name!r} says discover: true, but this process is not connected to a Ray "
                          f"cluster: ray.init(address=...) first, or list the nodes (discover: false)")
    return ray.nodes()
