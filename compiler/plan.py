"""The Plan the runtime executes: a DAG of load / evict / generate steps.

Contract with the executor: a step may start once all its `deps` are done (no level barriers);
steps that share a `stream` run one at a time, in plan order. `steps` is listed in the planned order,
which is a topological order of the DAG. The dependencies alone make any execution order respect
the memory budget (see compiler/lower.py for why), so the executor never re-plans.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from compiler.ir import Graph
from compiler.serialize import graph_from_dict, graph_to_dict

PLAN_VERSION = 1


class StepKind(str, Enum):
    LOAD = "load"
    EVICT = "evict"
    GENERATE = "generate"


@dataclass(frozen=True)
class Step:
    id: str  # stable, readable: "load:m#0", "gen:m#3", "evict:m#0" (k-th step of that kind for that model)
    kind: StepKind
    model: str
    nodes: tuple[str, ...] = ()  # generate: the batch's node ids, in batch order
    deps: tuple[str, ...] = ()  # step ids that must finish before this one starts
    stream: int = 0  # worker/stream; generates of one model always share one stream
    est_s: float = 0.0  # cost-model estimate of this step's duration
    bytes: int = 0  # load/evict: the model's footprint; generate: the batch's KV bytes
    slots: int = 0  # generate: rows decoding at once, the others join as rows finish; 0 = all nodes at once

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind.value, "model": self.model, "nodes": list(self.nodes),
                "deps": list(self.deps), "stream": self.stream, "est_s": self.est_s, "bytes": self.bytes,
                "slots": self.slots}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        return cls(d["id"], StepKind(d["kind"]), d["model"], tuple(d.get("nodes", ())), tuple(d.get("deps", ())),
                   d.get("stream", 0), d.get("est_s", 0.0), d.get("bytes", 0), d.get("slots", 0))


@dataclass
class Plan:
    steps: list[Step]
    memory_budget: Optional[int]
    footprints: dict[str, int]  # model -> bytes it holds while resident (weights + largest batch KV)
    streams: int = 1  # compute streams; loads/evicts use stream index `streams`
    eviction: str = "belady"
    aliases: dict[str, str] = field(default_factory=dict)  # node deduped away -> node whose answer it takes
    graph: Optional[Graph] = None  # the compiled graph whose node ids the steps name
    report: Any = field(default=None, compare=False, repr=False)  # CompileReport: diagnostics, never serialized

    # --- queries ----------------------------------------------------------------------------------
    def step_of_node(self) -> dict[str, str]:
        """Node id -> the generate step that answers it (part nodes: their fused node's step)."""
        out = {nid: s.id for s in self.steps if s.kind is StepKind.GENERATE for nid in s.nodes}
        if self.graph is not None:
            for node in self.graph:
                if node.part_of is not None:
                    out[node.id] = out[node.part_of]
        return out

    def count(self, kind: StepKind) -> int:
        return sum(1 for s in self.steps if s.kind is kind)

    @property
    def loads(self) -> int:
        return self.count(StepKind.LOAD)

    def memory_profile(self) -> list[tuple[str, int]]:
        """(step id, planned resident bytes after it), in plan order."""
        resident, out = 0, []
        for s in self.steps:
            if s.kind is StepKind.LOAD:
                resident += s.bytes
            elif s.kind is StepKind.EVICT:
                resident -= s.bytes
            out.append((s.id, resident))
        return out

    @property
    def peak_planned_bytes(self) -> int:
        return max((b for _, b in self.memory_profile()), default=0)

    def critical_path_s(self) -> float:
        """Longest chain of estimated step times through the dependencies (infinite workers)."""
        finish: dict[str, float] = {}
        for s in self.steps:
            finish[s.id] = max((finish[d] for d in s.deps), default=0.0) + s.est_s
        return max(finish.values(), default=0.0)

    def estimated_span_s(self) -> float:
        """Makespan when each stream runs its steps one at a time in plan order, each after its deps."""
        finish: dict[str, float] = {}
        free: dict[int, float] = {}
        for s in self.steps:
            start = max(max((finish[d] for d in s.deps), default=0.0), free.get(s.stream, 0.0))
            finish[s.id] = free[s.stream] = start + s.est_s
        return max(finish.values(), default=0.0)

    # --- text and JSON ----------------------------------------------------------------------------
    def dump(self) -> str:
        """Readable, stable text: one line per step (for `explain` and golden tests)."""
        budget = "unlimited" if self.memory_budget is None else f"{self.memory_budget:,}"
        lines = [f"plan steps={len(self.steps)} loads={self.loads} budget={budget} peak={self.peak_planned_bytes:,} "
                 f"eviction={self.eviction} streams={self.streams}"]
        lines += [f"  footprint {m}={b:,}" for m, b in self.footprints.items()]
        lines += [f"  alias {a} -> {k}" for a, k in self.aliases.items()]
        for (sid, resident), s in zip(self.memory_profile(), self.steps):
            what = f"{s.kind.value} {s.model}" + (f" ({', '.join(s.nodes)})" if s.nodes else "")
            what += f" {s.slots} at a time" if s.slots else ""
            deps = f" after {', '.join(s.deps)}" if s.deps else ""
            lines.append(f"  [{s.stream}] {sid}: {what}{deps} | resident={resident:,}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "memory_budget": self.memory_budget,
            "streams": self.streams,
            "eviction": self.eviction,
            "footprints": dict(self.footprints),
            "aliases": dict(self.aliases),
            "steps": [s.to_dict() for s in self.steps],
            "graph": None if self.graph is None else graph_to_dict(self.graph),
        }

    def to_json(self, indent: Optional[int] = None) -> str:
        """Deterministic for a given graph + cost model + config (no timings, no unordered sets)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        return cls(
            steps=[Step.from_dict(s) for s in d["steps"]],
            memory_budget=d.get("memory_budget"),
            footprints=dict(d.get("footprints", {})),
            streams=d.get("streams", 1),
            eviction=d.get("eviction", "belady"),
            aliases=dict(d.get("aliases", {})),
            graph=None if d.get("graph") is None else graph_from_dict(d["graph"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
