"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and one histogram are all
the server needs, and prometheus_client is not a dependency."""
from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for key, value in sorted(self.values.items()):
                yield f"{self.name}{_labels(key)} {_num(value)}"


class Gauge:
    """Read when scraped: the value lives where it is kept (the admission counters, the running plan)."""

    def __init__(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge"):
        self.name, self.help, self.read, self.kind = name, help, read, kind

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield f"{self.name} {_num(self.read())}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts: dict[Labels, list[int]] = {}  # per bucket (not cumulative), the last one is +Inf
        self.sums: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sums[key] = self.sums.get(key, 0.0) + value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for key, counts in sorted(self.counts.items()):
                total = 0
                for bound, count in zip([*map(_num, self.buckets), "+Inf"], counts):
                    total += count
                    yield f"{self.name}_bucket{_labels(key, (('le', bound),))} {total}"
                yield f"{self.name}_sum{_labels(key)} {_num(self.sums[key])}"
                yield f"{self.name}_count{_labels(key)} {total}"


class Metrics:
    """What /metrics shows. The gauges read live values through the callables the service passes in."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float],
                 plan_increments: Callable[[], float]):
        self.requests = Counter("compllm_requests_total", "HTTP requests answered, by endpoint and status code")
        self.latency = Histogram("compllm_request_latency_seconds",
                                 "chat completion latency from arrival to the last byte, by status code")
        self.first_token = Histogram("compllm_time_to_first_token_seconds",
                                     "streamed chat completions: arrival to the first content chunk")
        self.nodes = Counter("compllm_nodes_executed_total", "plan nodes ended, by expert and status")
        self.tokens = Counter("compllm_tokens_total", "tokens of plan nodes, by model alias and kind (prompt/output)")
        self.cancelled = Counter("compllm_nodes_cancelled_total",
                                 "nodes skipped because their request went away or ran out of time")
        self.gauges = [
            Gauge("compllm_queue_depth", "requests waiting for a place in the pipe", queue_depth),
            Gauge("compllm_in_flight", "requests in the pipe now", in_flight),
            Gauge("compllm_plan_increments_total", "plan increments compiled into the running plan",
                  plan_increments, kind="counter"),
        ]

    def node_ended(self, expert: str, model: str, status: str, error: str, prompt_tokens: int,
                   output_tokens: int) -> None:
        self.nodes.inc(expert=expert, status=status)
        if status == "skipped" and error == "cancelled":
            self.cancelled.inc()
        if model:
            self.tokens.inc(prompt_tokens, model=model, kind="prompt")
            self.tokens.inc(output_tokens, model=model, kind="output")

    def render(self) -> str:
        families = [self.requests, self.latency, self.first_token, self.nodes, self.tokens, self.cancelled,
                    *self.gauges]
        return "\n".join(line for family in families for line in family.render()) + "\n"
