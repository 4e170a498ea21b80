"""Runs an ordered pass pipeline named by config, checking the IR before it and after every pass.

Before anything runs, the pipeline is checked against the passes' contracts (`check_pipeline`): every pass's
requirements must be provided by an earlier active pass and not invalidated since, and lowering's (a schedule
and a residency plan) by the end; a pass that invalidates what an earlier pass provided is an ordering mistake.
Each problem is one line naming both passes and the fix. An invalid input raises the verifier's own error (the user's graph is wrong); an invariant broken
after a pass raises `PassError` naming that pass (the pass is wrong). A pass that left every node
and query object in place (it only annotated) skips the IR re-check, which could not fail, but its
own `check` still runs. Per-pass seconds are recorded
(verification separately, so benchmarks see what the passes cost), and an IR text dump after each
pass can be kept and/or written to files, for `explain` and for debugging a pass.
"""
from __future__ import annotations

import operator
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from compiler.config import PassContext
from compiler.errors import CompileError, ConfigError, PassError
from compiler.ir import Graph
from compiler.passes import LOWERING_REQUIRES, REGISTRY, Pass
from compiler.passes.registry import providers
from compiler.verify import GraphError, verify


class PipelineError(ConfigError):
    """The pass pipeline is misordered or misses a prerequisite; the message names the passes and the fix."""


def check_pipeline(passes: Sequence[Union[str, Pass]], disabled: Iterable[str] = (),
                   then_requires: frozenset[str] = LOWERING_REQUIRES) -> list[Pass]:
    """The active passes, in order, once the pipeline satisfies every contract; else `PipelineError`."""
    resolved = [_resolve(p) for p in passes]
    names = {p.name for p in resolved}
    disabled = list(disabled)
    for name in disabled:
        _resolve(name)
        if name not in names:
            raise PipelineError(f"compiler.disabled names {name!r}, which is not in compiler.passes "
                                f"({', '.join(names)})")
    active = [p for p in resolved if p.name not in set(disabled)]
    provided_by: dict[str, str] = {}  # annotation -> the pass that last provided it
    for p in active:
        _need(p.requires, provided_by, f"pass {p.name!r}", disabled)
        for key in sorted(p.invalidates & set(provided_by)):
            raise PipelineError(f"compiler.passes: {p.name!r} runs after {provided_by[key]!r} and invalidates its "
                                f"{key!r}: put {p.name!r} before {provided_by[key]!r}")
        for key in p.invalidates:
            provided_by.pop(key, None)
        provided_by.update({key: p.name for key in p.provides})
    _need(then_requires, provided_by, "lowering", disabled)
    return active


def _need(required: frozenset[str], provided_by: dict[str, str], who: str, disabled: list[str]) -> None:
    for key in sorted(required - set(provided_by)):
        by = providers(key)
        off = [name for name in by if name in disabled]
        if off:
            fix = (f"{off[0]!r} is disabled; to run every node alone set compiler.max_batch_size=1 "
                   f"compiler.max_call_size=1 instead" if key == "batches" else f"enable {off[0]!r}")
        else:
            fix = f"add {' or '.join(map(repr, by)) or 'a pass that provides it'} before it"
        raise PipelineError(f"compiler.passes: {who} needs {key!r}, which no earlier pass provides: {fix}")


def _resolve(p: Union[str, Pass]) -> Pass:
    if not isinstance(p, str):
        return p
    try:
        return REGISTRY[p]
    except KeyError:
        raise PipelineError(f"unknown compiler pass {p!r}; known: {', '.join(sorted(REGISTRY))}") from None


class PassManager:
    def __init__(self, passes: Sequence[Union[str, Pass]], disabled: Iterable[str] = (),
                 dump_dir: Optional[Union[str, Path]] = None, *, dump: bool = False, verify_each: bool = True,
                 then_requires: frozenset[str] = LOWERING_REQUIRES):
        self.active: list[Pass] = check_pipeline(passes, disabled, then_requires)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.keep_dumps = dump or self.dump_dir is not None
        self.verify_each = verify_each
        self.timings: dict[str, float] = {}  # pass name -> seconds (pass body only)
        self.verify_seconds = 0.0
        self.dumps: list[tuple[str, str]] = []  # (pass name or "input", IR text after it)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        self.timings, self.verify_seconds, self.dumps = {}, 0.0, []
        self._verify(graph, ctx, None)
        self._dump("input", graph)
        for p in self.active:
            before = _snapshot(graph) if self.verify_each else None
            start = time.perf_counter()
            out = p(graph, ctx)
            self.timings[p.name] = self.timings.get(p.name, 0.0) + time.perf_counter() - start
            if not isinstance(out, Graph):
                raise PassError(p.name, TypeError(f"returned {type(out).__name__}, not a Graph"))
            if self.verify_each:
                self._verify(out, ctx, p, skip_ir=_same_snapshot(before, _snapshot(out)))
            if not _idle(p, graph, out):
                self._dump(p.name, out)
            graph = out
        return graph

    def _verify(self, graph: Graph, ctx: PassContext, after: Optional[Pass], skip_ir: bool = False) -> None:
        start = time.perf_counter()
        try:
            if not skip_ir:
                verify(graph, ctx.known_experts)
            if after is not None and after.check is not None:
                after.check(graph, ctx)
        except (GraphError, CompileError) as exc:
            if after is None:
                raise  # the input graph is invalid: keep the verifier's own error and message
            raise PassError(after.name, exc) from exc
        finally:
            self.verify_seconds += time.perf_counter() - start

    def _dump(self, name: str, graph: Graph) -> None:
        if not self.keep_dumps:
            return
        text = ir_text(graph)
        self.dumps.append((name, text))
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{len(self.dumps) - 1:02d}-{name}.txt").write_text(text + "\n", encoding="utf-8")


def _idle(p: Pass, before: Graph, after: Graph) -> bool:
    """The pass had nothing to do here (returned its input without what it provides, e.g. `place` on one
    process): its dump would repeat the previous one, so none is kept."""
    return after is before and bool(p.provides) and not p.provides & set(after.annotations)


def _snapshot(graph: Graph) -> tuple:
    """The IR's identity: node ids plus the (immutable) node and query objects themselves, in order.

    Taken before a pass runs (holding references, so no object id can be reused meanwhile): if the pass only
    added annotations, the snapshots match and re-verifying the IR would prove nothing new; a pass that
    mutated its input in place changes the snapshot and is verified as usual.
    """
    return tuple(graph.nodes), tuple(graph.nodes.values()), tuple(graph.queries.values())


def _same_snapshot(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and len(a[2]) == len(b[2]) and all(map(operator.is_, a[1], b[1])) \
        and all(map(operator.is_, a[2], b[2]))


def ir_text(graph: Graph) -> str:
    """`graph.dump()` plus the annotations passes added (each rendered by its `dump()` when it has one)."""
    parts = [graph.dump()]
    for key, value in graph.annotations.items():
        if hasattr(value, "dump"):
            parts.append(value.dump())
        elif isinstance(value, dict):
            parts.append(f"{key}:" + "".join(f"\n  {k} -> {v}" for k, v in value.items()))
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key}:" + "".join(f"\n  {v.dump() if hasattr(v, 'dump') else v}" for v in value))
        else:
            parts.append(f"{key}: {value!r}")
    return "\n".join(parts)
