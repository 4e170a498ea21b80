"""The typed sub-query DAG: the one IR every stage of compllm hands to the next.

Pure Python on purpose (no torch): the compiler must be fast to test and reusable.
A `Graph` may hold many queries at once, so passes can group work across queries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from typing import Any, Iterator, Mapping

#: The expert name aggregate nodes carry: their model is the aggregator's (reserved, no expert may use it).
AGGREGATOR = "aggregator"

#: `{#2}` in a node's template is filled with the answer of the node bound to "#2" in `Node.inputs`.
REFERENCE = re.compile(r"\{(#[A-Za-z0-9_.:-]+)\}")


class NodeKind(str, Enum):
    SUBQUERY = "subquery"
    AGGREGATE = "aggregate"
    RETRIEVE = "retrieve"  # reads a knowledge source; its answer is passages (AnswerType.PASSAGES), no LLM call
    # A cascade's second try: the same question on a bigger model, run only when its `guard` holds (the draft
    # it reads was unsure); otherwise its answer is the draft's. Made by the `cascade` pass.
    ESCALATE = "escalate"


class HostOp(str, Enum):
    """Work a node needs no model call for; the plan runs it as a zero-cost host step."""

    JOIN = "join"  # the answers of the node's inputs, in input order (one input: that answer, unchanged)


class AnswerType(str, Enum):
    TEXT = "text"
    NUMBER = "number"
    CHOICE = "choice"
    YESNO = "yesno"
    ENTITY = "entity"
    LIST = "list"
    PASSAGES = "passages"  # a retrieve node's output: passages with ids and scores

    @classmethod
    def parse(cls, value: str | "AnswerType") -> "AnswerType":
        try:
            return cls(value)
        except ValueError:
            return cls.TEXT


@dataclass(frozen=True)
class Provenance:
    """Where a node came from, kept so results can explain routing decisions."""

    query_id: str
    subquery_index: int | None = None
    route_score: float | None = None
    routed_by: str = "router"  # router | fallback | aggregator | decomposer-fallback


@dataclass(frozen=True)
class Guard:
    """A planned condition on a node's execution: run it only when the `source` node (a parent) answered with a
    confidence below `threshold`, or failed, or its engine reported no confidence. Otherwise the node takes the
    source's answer as its own. The compiler sets it; the runtime only evaluates `escalates`.
    `expected_rate`: the share of such nodes the compiler expects to run (the cost model's estimate; memory is
    always planned for all of them)."""

    source: str
    threshold: float
    expected_rate: float = 1.0

    def escalates(self, ok: bool, confidence: float | None) -> bool:
        return not ok or confidence is None or confidence < self.threshold

    def describe(self) -> str:
        return f"confidence({self.source}) < {self.threshold:g}"


@dataclass(frozen=True)
class Node:
    id: str
    kind: NodeKind
    template: str
    expert: str
    inputs: Mapping[str, str] = field(default_factory=dict)  # reference label ("#2") -> parent node id
    answer_type: AnswerType = AnswerType.TEXT
    accepts: frozenset[AnswerType] | None = None  # answer types this node can consume; None = any
    est_prompt_tokens: int = 0
    est_output_tokens: int | None = None  # None: unknown (the cost model's default); 0: no output at all
    provenance: Provenance | None = None
    # Set by the `fuse` pass: the original node ids this node answers for, in step order. The runtime asks
    # one model call for all of them and splits the answer back (see compiler.passes.fuse.split_answer).
    fused_from: tuple[str, ...] = ()
    # Set by `fuse` on a chain member other than the last: this node's answer is its part of the reply of the
    # fused node `part_of` (its only parent). It needs no model call and is in no generate step; consumers
    # keep reading it by its original id, so their prompts do not change.
    part_of: str | None = None
    # Set when the graph is built: the node is answered on the host, without a model call (e.g. a query's
    # final answer that is its parts' answers joined). Passes never batch it; lowering emits a host step.
    host: HostOp | None = None
    # The model alias that runs the node when it is not its expert's own (a cascade escalates an expert's question
    # to a bigger model under the same system prompt); "" = the expert's model.
    model: str = ""
    # Set by the `cascade` pass on ESCALATE nodes: the node runs only when the guard holds (see Guard).
    guard: Guard | None = None

    @property
    def needs_model(self) -> bool:
        """Whether a model call answers this node (host nodes, retrieve nodes and fused-chain parts need none of
        their own)."""
        return self.host is None and self.part_of is None and self.kind is not NodeKind.RETRIEVE

    @cached_property  # computed once per (immutable) node: passes and the verifier ask for it a lot
    def parents(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.inputs.values()))

    def references(self) -> list[str]:
        """Reference labels used in the template, in order of appearance."""
        return REFERENCE.findall(self.template)

    def with_(self, **changes) -> "Node":
        return replace(self, **changes)


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    sink: str  # id of the query's aggregate node


@dataclass
class Graph:
    """Nodes keyed by id (insertion ordered) plus the queries they answer."""

    nodes: dict[str, Node] = field(default_factory=dict)
    queries: dict[str, Query] = field(default_factory=dict)
    # What passes learned about the graph without rewriting it (e.g. "aliases", "batches", "schedule").
    # Passes that rewrite nodes drop the derived entries they would invalidate.
    annotations: dict[str, Any] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        if node.id in self.nodes:
            raise ValueError(f"duplicate node id {node.id!r}")
        self.nodes[node.id] = node
        return node

    def add_query(self, query: Query) -> None:
        if query.id in self.queries:
            raise ValueError(f"duplicate query id {query.id!r}")
        self.queries[query.id] = query

    def copy(self) -> "Graph":
        """Shallow copy (nodes are immutable), so a pass can rewrite without touching its input."""
        return Graph(dict(self.nodes), dict(self.queries), dict(self.annotations))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def edges(self) -> Iterator[tuple[str, str]]:
        """(parent, child) pairs: the data dependencies."""
        for node in self.nodes.values():
            for parent in node.parents:
                yield parent, node.id

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {nid: [] for nid in self.nodes}
        for parent, child in self.edges():
            out.setdefault(parent, []).append(child)
        return out

    def dump(self) -> str:
        """Stable, readable text form (one line per node), for humans and golden tests."""
        lines = []
        for q in self.queries.values():
            lines.append(f"query {q.id} sink={q.sink}: {q.text!r}")
        for n in self.nodes.values():
            ins = ", ".join(f"{k}={v}" for k, v in n.inputs.items())
            lines.append(
                f"  {n.id} [{n.kind.value}] expert={n.expert} type={n.answer_type.value}"
                + (f" inputs({ins})" if ins else "")
                + (f" fused_from({', '.join(n.fused_from)})" if n.fused_from else "")
                + (f" part_of({n.part_of})" if n.part_of else "")
                + (f" host({n.host.value})" if n.host else "")
                + (f" model={n.model}" if n.model else "")
                + (f" guard({n.guard.describe()}, expected {n.guard.expected_rate:g})" if n.guard else "")
                + f": {n.template!r}"
            )
        return "\n".join(lines)
