"""The pass registry: config names a pipeline by pass names; each name maps to one pass here.

A pass is any callable `(graph, ctx) -> Graph` with a `name`; it returns a new graph (rewrite)
or a copy with annotations added. It never mutates its input, so the pass manager can dump and
compare before/after. A pass may also have `check(graph, ctx)`, run after it to validate its annotations.
"""
from __future__ import annotations

from typing import Callable, Protocol

from compiler.config import PassContext
from compiler.ir import Graph

#: Annotations computed from the nodes; a pass that rewrites nodes must drop them (they would be stale).
DERIVED_ANNOTATIONS = ("levels", "batches", "schedule")


class Pass(Protocol):
    name: str  # optional attribute `check(graph, ctx)`: validates the pass's annotations after it ran

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph: ...


REGISTRY: dict[str, Pass] = {}


def register(name: str) -> Callable[[Callable], Pass]:
    """Decorator: give a `(graph, ctx) -> Graph` function its pass name and make config able to name it."""

    def wrap(fn: Callable) -> Pass:
        fn.name = name  # type: ignore[attr-defined]
        REGISTRY[name] = fn  # type: ignore[assignment]
        return fn  # type: ignore[return-value]

    return wrap


def rewritten(graph: Graph) -> Graph:
    """A copy of `graph` for a pass that rewrites nodes: derived annotations are dropped, facts kept."""
    out = graph.copy()
    for key in DERIVED_ANNOTATIONS:
        out.annotations.pop(key, None)
    return out


# Importing the modules registers the passes (after `register` exists: they import it from here).
from compiler.passes import batch, dedupe, fuse, level_schedule  # noqa: E402,F401
