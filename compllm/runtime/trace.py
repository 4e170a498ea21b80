"""Chrome trace-event JSON of a run: open `trace.json` in https://ui.perfetto.dev or chrome://tracing.

Rows: one per stream/worker (the planner call, loads, evictions, batched generate calls, host steps) and one
per query (each node's span), so idle gaps and how batches serve several queries are visible at a glance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from compiler import trace_events as te
from compllm.runtime.result import NodeResult


WORKER_ROWS = 1000  # trace row ids of remote workers (actors) start here, after the plan's streams


@dataclass(frozen=True)
class StepRecord:
    step_id: str
    kind: str  # plan | load | evict | generate | host
    model: str
    stream: int
    start: float  # seconds since the run started
    end: float
    nodes: Sequence[str] = ()
    slots: int = 0  # generate: rows decoding at once when the call refills (0: all at once)
    worker: str = ""  # where it ran when not in this process, e.g. a Ray actor "small@n1": a trace row of its own


@dataclass(frozen=True)
class Mark:
    """A moment on a stream's row, e.g. when the planner's output for a sub-query was parsed."""

    name: str
    stream: int
    at: float  # seconds since the run started


def chrome_trace(policy: str, nodes: Iterable[NodeResult], steps: Sequence[StepRecord] = (),
                 marks: Sequence[Mark] = (), engines: Mapping[str, str] = {}) -> dict:
    """`engines`: model -> the engine that runs it (the plan's), named on each of its steps."""
    events: list[dict] = [te.process_name(1, f"compllm {policy}: streams"),
                          te.process_name(2, f"compllm {policy}: queries")]
    workers = {w: WORKER_ROWS + i for i, w in enumerate(sorted({s.worker for s in steps if s.worker}))}
    for stream in sorted({s.stream for s in steps if not s.worker} | {m.stream for m in marks}):
        events.append(te.thread_name(1, stream, "planner" if stream < 0 else f"stream {stream}"))
    for worker, tid in workers.items():
        events.append(te.thread_name(1, tid, f"actor {worker}"))
    for m in marks:
        events.append(te.instant(m.name, 1, m.stream, m.at, {}))
    for s in steps:
        tid = workers[s.worker] if s.worker else s.stream
        name = f"{s.kind} {s.model}".rstrip() + (f" x{len(s.nodes)}" if s.nodes else "") + \
            (f" ({s.slots} at a time)" if s.slots else "")
        events.append(te.span(name, s.kind, 1, tid, s.start, s.end,
                              {"step": s.step_id, "nodes": list(s.nodes), **({"slots": s.slots} if s.slots else {}),
                               **({"stream": s.stream, "worker": s.worker} if s.worker else {}),
                               **({"engine": engines[s.model]} if s.model in engines else {})}))
    queries: dict[str, int] = {}
    for r in nodes:
        tid = queries.setdefault(r.query_id, len(queries))
        events.append(te.span(f"{r.node_id} [{r.expert}]", r.kind, 2, tid, r.start, r.end,
                              {"status": r.status, "model": r.model, "batch_size": r.batch_size,
                               "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                               **({"error": r.error} if r.error else {}), **({"note": r.note} if r.note else {}),
                               **({"confidence": round(r.confidence, 4)} if r.confidence is not None else {}),
                               **({"escalated": r.escalated} if r.escalated is not None else {})}))
    for qid, tid in queries.items():
        events.append(te.thread_name(2, tid, f"query {qid}"))
    return te.trace(events)
