"""How much of this process's CPUs other processes used over an interval: the "busy machine" signal.

Why not only the spread of repeated timings: a machine kept busy by one steady job slows every round alike, so
rounds agree with each other and are all wrong. The kernel counts CPU time per CPU (/proc/stat) and per process
(os.times), so the share the others took is measured, not guessed: (busy time of our CPUs - our own CPU time) /
(wall time x our CPUs). Where /proc/stat is missing the share is None and only the timings' spread is judged.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_STAT = Path("/proc/stat")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _our_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _busy_seconds(cpus: set[int]) -> float | None:
    """Seconds the given CPUs spent not idle since boot (user+nice+system+irq+softirq+steal)."""
    try:
        lines = _STAT.read_text().splitlines()
    except OSError:
        return None
    busy = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # steal: another VM had it
        seen += 1
    return busy / _TICK if seen else None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class CpuMeter:
    """`m = CpuMeter.start(); ...; m.others_share()` -> 0.0 (quiet) .. 1.0 (others had all our CPUs)."""

    wall: float
    busy: float | None
    own: float
    cpus: set[int]

    @classmethod
    def start(cls) -> "CpuMeter":
        cpus = _our_cpus()
        return cls(time.perf_counter(), _busy_seconds(cpus), _own_cpu_seconds(), cpus)

    def others_share(self) -> float | None:
        busy = _busy_seconds(self.cpus)
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        # clock ticks are coarse (10 ms): clamp the rounding into [0, 1]
        return min(max(others / (wall * len(self.cpus)), 0.0), 1.0)
