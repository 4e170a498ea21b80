"""Chrome trace-event JSON of a run: open `trace.json` in https://ui.perfetto.dev or chrome://tracing.

Rows: one per stream/worker (loads, evictions, batched generate calls) and one per query (each node's
span), so idle gaps and how batches serve several queries are visible at a glance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from compllm.runtime.result import NodeResult

US = 1e6


@dataclass(frozen=True)
class StepRecord:
    step_id: str
    kind: str  # load | evict | generate
    model: str
    stream: int
    start: float  # seconds since the run started
    end: float
    nodes: Sequence[str] = ()
    slots: int = 0  # generate: rows decoding at once when the call refills (0: all at once)


def _event(name: str, cat: str, pid: int, tid: int, start: float, end: float, args: dict) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": round(start * US, 1),
            "dur": round(max(end - start, 0.0) * US, 1), "args": args}


def _thread_name(pid: int, tid: int, name: str) -> dict:
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def chrome_trace(policy: str, nodes: Iterable[NodeResult], steps: Sequence[StepRecord] = ()) -> dict:
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"compllm {policy}: streams"}},
                          {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": f"compllm {policy}: queries"}}]
    for stream in sorted({s.stream for s in steps}):
        events.append(_thread_name(1, stream, f"stream {stream}"))
    for s in steps:
        name = f"{s.kind} {s.model}" + (f" x{len(s.nodes)}" if s.nodes else "") + \
            (f" ({s.slots} at a time)" if s.slots else "")
        events.append(_event(name, s.kind, 1, s.stream, s.start, s.end,
                             {"step": s.step_id, "nodes": list(s.nodes), **({"slots": s.slots} if s.slots else {})}))
    queries: dict[str, int] = {}
    for r in nodes:
        tid = queries.setdefault(r.query_id, len(queries))
        events.append(_event(f"{r.node_id} [{r.expert}]", r.kind, 2, tid, r.start, r.end,
                             {"status": r.status, "model": r.model, "batch_size": r.batch_size,
                              "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                              **({"error": r.error} if r.error else {}), **({"note": r.note} if r.note else {})}))
    for qid, tid in queries.items():
        events.append(_thread_name(2, tid, f"query {qid}"))
    return {"traceEvents": events, "displayTimeUnit": "ms"}
