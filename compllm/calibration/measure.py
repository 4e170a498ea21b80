"""Timing rounds and the verdict on them: good enough to store, or noise from a busy machine.

A round measures every quantity once, in the same order (interleaved: a burst of other work lands in one round,
not on one batch size): the prefill seconds per prompt token at batch 1, then one decode step at each batch size.
A warm-up round first runs every shape once (kernels and allocators are set up per shape) and is not judged.
After `min_rounds`, the numbers are judged (`judge`):

* a round is **contaminated** when other processes used more than `max_others_cpu` of our CPUs during it
  (`contention.CpuMeter`); only clean rounds count;
* the numbers are **stable** when, for every quantity, the `min_rounds` fastest clean values agree within
  `max_spread` (max/min); a single slow round among them means the machine was not quiet;
* the batch curve is **sane** when no batch step costs more than its rows one at a time, give or take
  `batch_tolerance` (step(b) <= b x step(1) x 1.1): a busy machine once stored batch 2 at 4-7x batch 1, which made
  the compiler stop batching. The tolerance is needed: on an AVX-512 CPU, quiet, 8 rounds agreeing within 3%, the
  fp32 decode step of Qwen2.5-0.5B costs 79.2 ms at batch 1 and 159.2 / 158.0 / 160.2 ms at batch 2 / 4 / 8
  (SmolLM2: 29.3 and 60.1 / 61.7 / 64.9 ms): batch 1 has a matrix-vector fast path, so batch 2 is exactly twice.

While the verdict is bad, another round is taken, up to `max_rounds` rounds; no measurement starts after
`max_seconds`. If the verdict is still bad, the measurement is refused (never stored). Each stored number is the
minimum over clean rounds: other work only ever adds time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol as TypingProtocol, Sequence

from compllm.calibration.contention import CpuMeter

PREFILL = "prefill"


def step_key(batch: int) -> str:
    return f"step@{batch}"


@dataclass(frozen=True)
class Protocol:
    """What is measured and how hard we try. Defaults: one round is a 256-token prefill, then per batch size a
    16-token prefill and 4 timed decode steps; on a 2-core CPU with Qwen2.5-0.5B fp32 (248-491 ms per decode step,
    5.6 ms per prefill token, `experiments/bench_decode_step.md`) that is ~8 s a round, ~4 s the warm-up."""

    prompt_tokens: int = 256  # prefill timing: one row of this many tokens
    decode_steps: int = 4  # decode steps timed per batch size per round (after a short prefill)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  # the cost model takes the next measured size up
    step_prompt_tokens: int = 16  # prompt length before the timed decode steps
    min_rounds: int = 3  # clean rounds judged (after one warm-up round)
    max_rounds: int = 8  # rounds taken at most before refusing
    max_seconds: float = 60.0  # no new measurement starts after this long (a busy machine: refuse, don't linger)
    max_spread: float = 1.5  # the min_rounds fastest clean values of a quantity agree within this factor
    max_others_cpu: float = 0.25  # a round is contaminated when others used more of our CPUs than this
    batch_tolerance: float = 1.1  # step(b) may exceed b x step(1) by this factor (see the module docstring)
    memory_rows: int = 2  # the workspace probe: one prefill of rows x prompt_tokens
    warmup: bool = True

    def quantities(self) -> list[str]:
        return [PREFILL, *(step_key(b) for b in self.batch_sizes)]


class Probe(TypingProtocol):
    """What is timed: a model behind two calls (the hf backend's own prefill and decode step, or a fake)."""

    def prefill_seconds(self, rows: int, tokens: int) -> float: ...

    def decode_step_seconds(self, rows: int, prompt_tokens: int, steps: int) -> float: ...

    def prefill_memory(self, rows: int, tokens: int) -> tuple[float, float]: ...


@dataclass
class Round:
    values: dict[str, float]  # quantity -> seconds (prefill: per token; step@b: per decode step)
    others_cpu: float | None  # share of our CPUs other processes used during the round
    seconds: float

    def clean(self, protocol: Protocol) -> bool:
        return self.others_cpu is None or self.others_cpu <= protocol.max_others_cpu


@dataclass
class Verdict:
    ok: bool
    reason: str  # why not ok ("" when ok)
    values: dict[str, float]  # min over clean rounds (over all rounds when none was clean)
    spread: float  # worst max/min among the judged values of one quantity
    rounds: int
    clean_rounds: int
    others_cpu: float | None  # the largest share others took in any round
    seconds: float = 0.0
    history: list[Round] = field(default_factory=list, repr=False)


def measure_round(probe: Probe, protocol: Protocol, tick: Callable[[str, bool], None] = lambda what, done: None,
                  deadline: float = float("inf"), warmup: bool = False) -> Round | None:
    """One interleaved round: prefill, then a decode step at each batch size; `tick(what, done)` before and after
    each measurement. None when the deadline passed before the round was complete (a busy machine: stop early).
    A warm-up round runs every shape once but only one decode step per batch size: kernels are set up per shape."""
    steps = 1 if warmup else protocol.decode_steps
    meter, start = CpuMeter.start(), time.perf_counter()
    tick(PREFILL, False)
    values = {PREFILL: probe.prefill_seconds(1, protocol.prompt_tokens) / protocol.prompt_tokens}
    tick(PREFILL, True)
    for b in protocol.batch_sizes:
        if time.perf_counter() > deadline:
            return None
        tick(step_key(b), False)
        values[step_key(b)] = probe.decode_step_seconds(b, protocol.step_prompt_tokens, steps)
        tick(step_key(b), True)
    return Round(values, meter.others_share(), time.perf_counter() - start)


def judge(rounds: Sequence[Round], protocol: Protocol) -> Verdict:
    """The verdict on the rounds so far (see the module docstring)."""
    clean = [r for r in rounds if r.clean(protocol)]
    pool = clean or list(rounds)
    values = {q: min(r.values[q] for r in pool) for q in protocol.quantities()}
    spread = 1.0
    for q in protocol.quantities():
        best = sorted(r.values[q] for r in pool)[: protocol.min_rounds]
        spread = max(spread, best[-1] / best[0] if best[0] > 0 else float("inf"))
    shares = [r.others_cpu for r in rounds if r.others_cpu is not None]
    others = max(shares) if shares else None
    reason = ""
    if len(clean) < protocol.min_rounds:
        worst = f"; other processes used up to {others:.0%} of this process's CPUs" if others is not None else ""
        reason = (f"only {len(clean)} of {len(rounds)} rounds ran on a quiet machine "
                  f"(need {protocol.min_rounds}){worst}")
    elif spread > protocol.max_spread:
        reason = f"timings of the fastest rounds differ by {spread:.2f}x (limit {protocol.max_spread}x)"
    else:
        one = values[step_key(1)] if step_key(1) in values else None
        for b in protocol.batch_sizes:
            if one is not None and b > 1 and values[step_key(b)] > b * one * protocol.batch_tolerance:
                reason = (f"a decode step at batch {b} measured {values[step_key(b)] * 1e3:.1f} ms, dearer than "
                          f"{b} steps at batch 1 ({b} x {one * 1e3:.1f} ms)")
                break
    return Verdict(not reason, reason, values, spread, len(rounds), len(clean), others, history=list(rounds))


def run_rounds(probe: Probe, protocol: Protocol, tick: Callable[[str, bool], None] = lambda what, done: None,
               on_extra_round: Callable[[int], None] = lambda n: None) -> Verdict:
    """Warm up, take `min_rounds` rounds, then more while the verdict is bad (see the module docstring); never
    start a measurement after `max_seconds`."""
    start = time.perf_counter()
    deadline = start + protocol.max_seconds
    if protocol.warmup:
        measure_round(probe, protocol, tick, deadline, warmup=True)
    rounds: list[Round] = []
    while len(rounds) < protocol.max_rounds and time.perf_counter() < deadline:
        if len(rounds) >= protocol.min_rounds:
            if judge(rounds, protocol).ok:
                break
            on_extra_round(len(rounds) + 1)
        round_ = measure_round(probe, protocol, tick, deadline)
        if round_ is None:
            break
        rounds.append(round_)
    seconds = time.perf_counter() - start
    if not rounds:
        return Verdict(False, f"not one round completed within {protocol.max_seconds:.0f} s: the machine is too "
                              f"busy", {}, float("inf"), 0, 0, None, seconds)
    verdict = judge(rounds, protocol)
    if not verdict.ok and len(rounds) < protocol.max_rounds:
        verdict.reason += f" (stopped at the {protocol.max_seconds:.0f} s limit)"
    verdict.seconds = seconds
    return verdict


def step_table(values: Mapping[str, float], batch_sizes: Sequence[int]) -> dict[str, float]:
    """{"1": s, "2": s, ...}: the cost model's `decode_step_s_by_batch`."""
    return {str(b): values[step_key(b)] for b in batch_sizes}
