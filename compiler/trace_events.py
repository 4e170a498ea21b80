"""Chrome trace-event JSON pieces (open the file at https://ui.perfetto.dev or chrome://tracing), shared by the
runtime's run traces and the simulator's, so both read the same in the viewer."""
from __future__ import annotations

from typing import Any

US = 1e6  # trace timestamps are microseconds


def span(name: str, cat: str, pid: int, tid: int, start: float, end: float, args: dict[str, Any]) -> dict[str, Any]:
    """A complete ("X") event from `start` to `end` seconds."""
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": round(start * US, 1),
            "dur": round(max(end - start, 0.0) * US, 1), "args": args}


def instant(name: str, pid: int, tid: int, at: float, args: dict[str, Any]) -> dict[str, Any]:
    """A point in time on one row (e.g. when a sub-query was parsed)."""
    return {"name": name, "ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": round(at * US, 1), "args": args}


def counter(name: str, pid: int, at: float, values: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "ph": "C", "pid": pid, "ts": round(at * US, 1), "args": values}


def process_name(pid: int, name: str) -> dict[str, Any]:
    return {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}


def thread_name(pid: int, tid: int, name: str) -> dict[str, Any]:
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def trace(events: list[dict[str, Any]], **other: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if other:
        out["otherData"] = other
    return out
