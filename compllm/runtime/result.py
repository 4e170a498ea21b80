"""What a run returns: every node's answer and cost, each query's final answer, and stage timings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from compiler.ir import Graph
    from compiler.plan import Plan
    from compllm.frontend.decomposer import Decomposition
    from compllm.frontend.router import Route
    from compllm.runtime.trace import StepRecord


@dataclass
class NodeResult:
    node_id: str
    query_id: str
    kind: str
    expert: str
    model: str  # the model alias the plan ran it on ("" for host steps)
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
    confidence: float | None = None  # the engine's confidence in the answer (backends.base.Generation.confidence)
    escalated: bool | None = None  # an escalate (cascade) node: whether its guard held and the big model ran

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class QueryResult:
    id: str
    query: str
    final_answer: str
    partial: bool  # some sub-query failed or was skipped, or parts were over a cap: the answer says which
    decomposition: dict[str, Any]
    nodes: list[NodeResult]
    latency: float = 0.0  # seconds from the run's start (planner included) to this query's final answer
    execute_latency: float = 0.0  # seconds from the plan's execution start to this query's final answer
    unanswered: list[str] = field(default_factory=list)  # which parts got no answer, and why


@dataclass
class RunResult:
    policy: str
    queries: list[QueryResult]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # alias -> load time, tokens
    errors: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the compiled plan that ran
    trace: dict[str, Any] = field(default_factory=dict)  # Chrome trace events; written to trace.json
    memory: dict[str, Any] = field(default_factory=dict)  # measured peak vs the compiler's planned peak and budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_execution(cls, policy: str, graph: "Graph", decompositions: Mapping[str, "Decomposition"],
                       routes: Mapping[str, Sequence["Route"]], node_results: Mapping[str, NodeResult], plan: "Plan",
                       records: Sequence["StepRecord"], timings: Mapping[str, float], loaded: Mapping[str, Any],
                       memory: dict[str, Any], execute_start: float, marks: Sequence[Any] = (),
                       order: Sequence[str] | None = None) -> "RunResult":
        """`decompositions` and `routes` by query id; `order`: the query ids in the order they were asked."""
        from compllm.runtime.trace import chrome_trace

        queries = [query_result(qid, graph.queries[qid].text, graph.queries[qid].sink, decompositions[qid],
                                routes[qid], graph, node_results, execute_start)
                   for qid in (order or list(graph.queries))]
        models = {alias: {"name": m.name, "load_seconds": round(m.stats.load_seconds, 3), "calls": m.stats.calls,
                          "prompt_tokens": m.stats.prompt_tokens, "output_tokens": m.stats.output_tokens,
                          **({"engine": plan.engines[alias]} if alias in plan.engines else {}),
                          **({"prefill_tokens_reused": m.stats.extra["prefill_tokens_reused"]}
                             if "prefill_tokens_reused" in m.stats.extra else {})}
                  for alias, m in loaded.items()}
        errors = [f"{r.node_id}: {r.error}" for q in queries for r in q.nodes if r.status == "failed"]
        trace = chrome_trace(policy, node_results.values(), records, marks, plan.engines)
        return cls(policy, queries, {k: round(v, 3) for k, v in timings.items()}, models, errors, plan.to_dict(),
                   trace, memory)


def query_result(qid: str, text: str, sink_id: str, d: "Decomposition", routes: Sequence["Route"], graph: "Graph",
                 results: Mapping[str, NodeResult], execute_start: float) -> QueryResult:
    """One query's result: its final answer (saying which parts have none, and why), every node's result, and
    its decomposition with each part's routing."""
    nodes = [results[n.id] for n in graph if n.provenance and n.provenance.query_id == qid]
    listed = {r.node_id for r in nodes}  # + nodes the compiler added (a cascade's drafts), after the original ones
    nodes += [r for r in results.values() if r.query_id == qid and r.node_id not in listed]
    sink = results[sink_id]
    unanswered = [f"part {graph.nodes[r.node_id].provenance.subquery_index}: {r.error or r.status}" for r in nodes
                  if not r.ok and r.kind in ("subquery", "escalate") and r.node_id in graph.nodes]
    if d.omitted:
        unanswered.append(d.omitted)
    final = sink.answer if sink.ok else f"(no answer: {sink.error})"
    if d.omitted:
        final += f"\n(Not answered: {d.omitted}.)"
    decomposition = {
        "fallback": d.fallback, "reason": d.reason, "format": d.format, "decoding": d.decoding,
        "closed_form": d.closed_form,
        # the planner call's [prompt, output] tokens (None: no model wrote the split)
        "planner_tokens": [d.generation.prompt_tokens, d.generation.output_tokens] if d.generation else None,
        "warnings": list(d.warnings),
        "raw_output": d.raw_output,
        "subqueries": [{**asdict(sq), "expert": r.expert, "route_score": round(r.score, 4), "routed_by": r.routed_by}
                       for sq, r in zip(d.subqueries, routes)],
    }
    return QueryResult(qid, text, final, bool(unanswered), decomposition, nodes, sink.end,
                       sink.end - execute_start, unanswered)
