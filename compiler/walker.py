"""The executor contract in one place: which plan steps may start now.

A step may start once every dependency is done and it is the first not-yet-started step of its stream (steps
of one stream run one at a time, in plan order). On a cluster every device has its own streams: a stream is
(`Step.node`, `Step.device`, `Step.stream`), so devices run side by side. The local executor (threads), the simulator (a virtual clock)
and any other executor drive the same walker, so they cannot disagree about the contract. Steps can be
appended while a plan runs (plan increments): started and finished steps are never changed.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

from compiler.plan import Step

Lane = tuple[str, int, int]


def lane(step: Step) -> Lane:
    """The stream a step runs on: (cluster node, device, stream); ("", 0, stream) in one process."""
    return step.node, step.device, step.stream


class PlanWalker:
    def __init__(self, steps: Iterable[Step] = ()):
        self.steps: dict[str, Step] = {}
        self._position: dict[str, int] = {}
        self._waiting: dict[str, int] = {}  # step id -> dependencies not done yet
        self._dependents: dict[str, list[str]] = {}
        self._queues: dict[Lane, deque[str]] = {}  # stream -> its steps not started yet, in plan order
        self._busy: set[Lane] = set()  # streams with a step running
        self._done: set[str] = set()
        self.extend(steps)

    def extend(self, steps: Iterable[Step]) -> None:
        """Append steps behind those already known; their deps must name known steps (plan order is topological)."""
        for step in steps:
            if step.id in self.steps:
                raise ValueError(f"step {step.id!r} is already in the plan")
            unknown = [d for d in step.deps if d not in self.steps]
            if unknown:
                raise ValueError(f"step {step.id!r} depends on {unknown[0]!r}, which is not an earlier step")
            self.steps[step.id] = step
            self._position[step.id] = len(self._position)
            deps = set(step.deps)
            self._waiting[step.id] = sum(1 for d in deps if d not in self._done)
            for d in deps:
                self._dependents.setdefault(d, []).append(step.id)
            self._queues.setdefault(lane(step), deque()).append(step.id)

    def ready(self) -> list[Step]:
        """Start (and return, in plan order) every step that may start now: its stream becomes busy."""
        started = []
        for stream, queue in self._queues.items():
            if queue and stream not in self._busy and not self._waiting[queue[0]]:
                started.append(self.steps[queue.popleft()])
                self._busy.add(stream)
        return sorted(started, key=lambda s: self._position[s.id])

    def finish(self, step_id: str) -> None:
        """Mark a started step done: its stream is free, its dependents wait for one step less."""
        step = self.steps[step_id]
        self._busy.discard(lane(step))
        self._done.add(step_id)
        for child in self._dependents.get(step_id, ()):
            self._waiting[child] -= 1

    @property
    def running(self) -> int:
        return len(self._busy)

    @property
    def finished(self) -> bool:
        return len(self._done) == len(self.steps)

    def stuck_heads(self) -> list[str]:
        """Steps at the head of their stream that can never start (for a diagnostic when nothing runs)."""
        return [q[0] for _, q in sorted(self._queues.items()) if q]
