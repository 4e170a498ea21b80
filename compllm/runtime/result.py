"""What a run returns: every node's answer and cost, each query's final answer, and stage timings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class NodeResult:
    node_id: str
    query_id: str
    kind: str
    expert: str
    model: str
    prompt: str = ""
    answer: str = ""
    status: str = "pending"  # ok | failed | skipped
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # seconds since the run started
    end: float = 0.0
    batch_size: int = 0
    finish_reason: str = ""
    attempts: int = 0  # model calls made for this node (retries included)
    note: str = ""  # e.g. "deduplicated: shares the answer of q0:3"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class QueryResult:
    id: str
    query: str
    final_answer: str
    partial: bool  # some sub-query failed or was skipped: the answer rests on what exists
    decomposition: dict[str, Any]
    nodes: list[NodeResult]
    latency: float = 0.0  # seconds from run start to this query's final answer


@dataclass
class RunResult:
    policy: str
    queries: list[QueryResult]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # alias -> load time, tokens
    errors: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the compiled plan that ran (None for the sequential baseline)
    trace: dict[str, Any] = field(default_factory=dict)  # Chrome trace events; written to trace.json
    memory: dict[str, Any] = field(default_factory=dict)  # measured peak vs the compiler's planned peak and budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
