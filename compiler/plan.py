"""The Plan the runtime executes: a DAG of load / evict / generate / host steps.

Contract with the executor: a step may start once all its `deps` are done (no level barriers);
steps that share a `stream` run one at a time, in plan order. `steps` is listed in the planned order,
which is a topological order of the DAG. The dependencies alone make any execution order respect
the memory budget (see compiler/lower.py for why), so the executor never re-plans. Streams: generate
steps use `0..streams-1` (one model's generates share one), loads and evicts use `io_stream`, host steps
(answers that need no model call) use `host_stream`. `verify()` checks all of this (compiler/plan_verify.py).
On a cluster (the `place` pass) load/generate/evict steps name their device (`node`, `device`): every device has
its own streams and its own memory (`Plan.devices`); host steps stay in the coordinating process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from compiler.cluster import device_key
from compiler.ir import Graph
from compiler.serialize import graph_from_dict, graph_to_dict

PLAN_VERSION = 2


class StepKind(str, Enum):
    LOAD = "load"
    EVICT = "evict"
    GENERATE = "generate"
    HOST = "host"  # answer its nodes on the host from their parents' answers (Node.host), no model
    RETRIEVE = "retrieve"  # run its retrieve nodes against their knowledge source, no model


#: Step kinds that answer nodes (the others move weights).
ANSWERING = (StepKind.GENERATE, StepKind.HOST, StepKind.RETRIEVE)


@dataclass(frozen=True)
class Step:
    id: str  # stable, readable: "load:m#0", "gen:m#3", "evict:m#0", "host:q0:agg"
    kind: StepKind
    model: str  # "" for host steps
    nodes: tuple[str, ...] = ()  # generate/host: the node ids it answers, in order
    deps: tuple[str, ...] = ()  # step ids that must finish before this one starts
    stream: int = 0
    est_s: float = 0.0  # cost-model estimate of this step's duration
    bytes: int = 0  # load/evict: the model's footprint; generate: the call's KV + workspace
    slots: int = 0  # generate: rows decoding at once, the others join as rows finish; 0 = all nodes at once
    node: str = ""  # cluster placement (the `place` pass): the cluster node that runs it; "" = this process
    device: int = 0  # with `node`: which of that node's devices (a model replica lives on one device)
    prefill_saved: int = 0  # generate: prompt tokens its engine's prefix cache saves (the `prefix` pass)

    @property
    def where(self) -> str:
        """The device that runs the step, as plans name it ("node/device"); "" = this process."""
        return device_key(self.node, self.device)

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "kind": self.kind.value, "model": self.model, "nodes": list(self.nodes),
             "deps": list(self.deps), "stream": self.stream, "est_s": self.est_s, "bytes": self.bytes,
             "slots": self.slots}
        if self.node:
            d["node"] = self.node
            d["device"] = self.device
        if self.prefill_saved:
            d["prefill_saved"] = self.prefill_saved
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        return cls(d["id"], StepKind(d["kind"]), d["model"], tuple(d.get("nodes", ())), tuple(d.get("deps", ())),
                   d.get("stream", 0), d.get("est_s", 0.0), d.get("bytes", 0), d.get("slots", 0), d.get("node", ""),
                   d.get("device", 0), d.get("prefill_saved", 0))


@dataclass
class Plan:
    steps: list[Step]
    memory_budget: Optional[int]
    footprints: dict[str, int]  # model -> bytes it holds while resident (weights + largest call)
    streams: int = 1  # compute streams
    residency: str = "belady"
    aliases: dict[str, str] = field(default_factory=dict)  # node deduped away -> node whose answer it takes
    graph: Optional[Graph] = None  # the compiled graph whose node ids the steps name
    base_bytes: int = 0  # held by the process throughout (runtime, imports, router embedder)
    load_extra: dict[str, int] = field(default_factory=dict)  # model -> bytes held only while it loads
    initial: tuple[str, ...] = ()  # models resident when the plan starts (loaded earlier, no load step)
    report: Any = field(default=None, compare=False, repr=False)  # CompileReport: diagnostics, never serialized
    # On a cluster (`place` pass): every device steps may name ("node/index") -> its memory in bytes (None =
    # unlimited). Each device is budgeted on its own (runtime base + its resident footprints); empty = local.
    devices: dict[str, Optional[int]] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)  # model -> the engine that runs it (cost.Engine.describe)

    @property
    def io_stream(self) -> int:
        return self.streams

    @property
    def host_stream(self) -> int:
        return self.streams + 1

    # --- queries ----------------------------------------------------------------------------------
    def step_of_node(self) -> dict[str, str]:
        """Node id -> the step that answers it (part nodes: their fused node's step)."""
        out = {nid: s.id for s in self.steps if s.kind in ANSWERING for nid in s.nodes}
        if self.graph is not None:
            for node in self.graph:
                if node.part_of is not None:
                    out[node.id] = out[node.part_of]
        return out

    def count(self, kind: StepKind) -> int:
        return sum(1 for s in self.steps if s.kind is kind)

    @property
    def prefill_saved(self) -> int:
        """Prompt tokens the engines' prefix caches save over the whole plan (summed over its generate steps)."""
        return sum(s.prefill_saved for s in self.steps)

    @property
    def loads(self) -> int:
        return self.count(StepKind.LOAD)

    def memory_profile(self) -> list[tuple[str, int, int]]:
        """(step id, planned bytes held after it, the most held while it runs), in plan order. Both include the
        runtime's base and the models resident from the start; a load also holds its transient while it runs."""
        base = self.base_bytes + sum(self.footprints.get(m, 0) for m in self.initial)
        held_on: dict[str, int] = {}  # device -> bytes held on it (on a cluster every device holds its own)
        out = []
        for s in self.steps:
            held = held_on.get(s.where, base)
            during = held
            if s.kind is StepKind.LOAD:
                during = held + s.bytes + self.load_extra.get(s.model, 0)
                held += s.bytes
            elif s.kind is StepKind.EVICT:
                held -= s.bytes
            held_on[s.where] = held
            out.append((s.id, held, max(during, held)))
        return out

    @property
    def peak_planned_bytes(self) -> int:
        start = self.base_bytes + sum(self.footprints.get(m, 0) for m in self.initial)
        return max((during for _, _, during in self.memory_profile()), default=start)

    def critical_path_s(self) -> float:
        """Longest chain of estimated step times through the dependencies (infinite workers)."""
        finish: dict[str, float] = {}
        for s in self.steps:
            finish[s.id] = max((finish[d] for d in s.deps), default=0.0) + s.est_s
        return max(finish.values(), default=0.0)

    def estimated_span_s(self) -> float:
        """Makespan when each stream runs its steps one at a time in plan order, each after its deps."""
        finish: dict[str, float] = {}
        free: dict[tuple[str, int, int], float] = {}
        for s in self.steps:
            lane = (s.node, s.device, s.stream)
            start = max(max((finish[d] for d in s.deps), default=0.0), free.get(lane, 0.0))
            finish[s.id] = free[lane] = start + s.est_s
        return max(finish.values(), default=0.0)

    def verify(self, cost: Any = None, orders: int = 3) -> None:
        """Raise `PlanError` unless the plan is complete, ordered and within budget in any execution order
        (`orders` random ones besides plan order); with `cost`, also that each node runs on its own model."""
        from compiler.plan_verify import verify_plan

        verify_plan(self, cost, orders)

    # --- text and JSON ----------------------------------------------------------------------------
    def dump(self) -> str:
        """Readable, stable text: one line per step (for `explain` and golden tests)."""
        budget = "unlimited" if self.memory_budget is None else f"{self.memory_budget:,}"
        lines = [f"plan steps={len(self.steps)} loads={self.loads} budget={budget} peak={self.peak_planned_bytes:,} "
                 f"residency={self.residency} streams={self.streams}"]
        if self.base_bytes:
            lines.append(f"  base {self.base_bytes:,}")
        if self.initial:
            lines.append(f"  resident at start: {', '.join(self.initial)}")
        lines += [f"  footprint {m}={b:,}" + (f" (+{self.load_extra[m]:,} while loading)"
                                              if self.load_extra.get(m) else "") for m, b in self.footprints.items()]
        lines += [f"  engine {m}: {e}" for m, e in self.engines.items()]
        lines += [f"  alias {a} -> {k}" for a, k in self.aliases.items()]
        for (sid, held, _), s in zip(self.memory_profile(), self.steps):
            what = f"{s.kind.value} {s.model}".rstrip() + (f" ({', '.join(s.nodes)})" if s.nodes else "")
            what += f" {s.slots} at a time" if s.slots else ""
            what += f" prefill saved {s.prefill_saved}" if s.prefill_saved else ""
            deps = f" after {', '.join(s.deps)}" if s.deps else ""
            at = f"{s.where} " if s.node else ""
            lines.append(f"  [{at}{s.stream}] {sid}: {what}{deps} | held={held:,}")
        return "\n".join(lines)

    def placement_text(self) -> str:
        """Per device: the models loaded there, its calls and their estimated seconds (`explain` on a cluster)."""
        if not self.devices:
            return "placement: this process (cluster=local)"
        models: dict[str, list[str]] = {k: [] for k in self.devices}
        calls: dict[str, int] = {k: 0 for k in self.devices}
        work: dict[str, float] = {k: 0.0 for k in self.devices}
        for s in self.steps:
            if s.kind is StepKind.LOAD and s.model not in models[s.where]:
                models[s.where].append(s.model)
            elif s.kind is StepKind.GENERATE:
                calls[s.where] += 1
                work[s.where] += s.est_s
        replicas: dict[str, list[str]] = {}
        for k, ms in models.items():
            for m in ms:
                replicas.setdefault(m, []).append(k)
        lines = [f"placement: {len(self.devices)} device(s), {sum(map(len, replicas.values()))} replica(s) of "
                 f"{len(replicas)} model(s)"]
        for k, budget in self.devices.items():
            mem = "unlimited" if budget is None else f"{budget / 1e9:.1f} GB"
            lines.append(f"  {k} ({mem}): {', '.join(models[k]) or '(idle)'}; {calls[k]} call(s), "
                         f"{work[k]:.2f} s estimated")
        lines += [f"  {m}: {len(ks)} replica(s)" for m, ks in replicas.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "memory_budget": self.memory_budget,
            "streams": self.streams,
            "residency": self.residency,
            "base_bytes": self.base_bytes,
            "initial": list(self.initial),
            "footprints": dict(self.footprints),
            "load_extra": dict(self.load_extra),
            "aliases": dict(self.aliases),
            **({"engines": dict(self.engines)} if self.engines else {}),
            "steps": [s.to_dict() for s in self.steps],
            "graph": None if self.graph is None else graph_to_dict(self.graph),
            **({"devices": dict(self.devices)} if self.devices else {}),
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
            residency=d.get("residency", "belady"),
            aliases=dict(d.get("aliases", {})),
            graph=None if d.get("graph") is None else graph_from_dict(d["graph"]),
            base_bytes=d.get("base_bytes", 0),
            load_extra=dict(d.get("load_extra", {})),
            initial=tuple(d.get("initial", ())),
            devices=dict(d.get("devices", {})),
            engines=dict(d.get("engines", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
