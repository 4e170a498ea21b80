"""Passes as objects with contracts, and the registry config names them from (after torch.fx's pass infra).

A pass is `(graph, ctx) -> Graph`: it returns a new graph (a rewrite) or a copy with annotations added, never
mutating its input. It declares the annotations it **requires** (an earlier pass must provide them), those it
**provides**, and those it **invalidates** (a rewrite of nodes makes derived annotations stale). The pass
manager checks a pipeline against these contracts before running it, so a misordered pipeline is refused with
a message naming both passes instead of silently compiling something else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from compiler.config import PassContext
from compiler.ir import Graph

#: Annotations computed from the nodes: a pass that rewrites nodes invalidates them.
DERIVED = frozenset({"batches", "prefixes", "schedule", "placement", "residency", "retrievals"})

#: What lowering needs: it only lowers, it never batches, orders or plans residency itself.
LOWERING_REQUIRES = frozenset({"batches", "schedule", "residency"})


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassContext], Graph]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    # Validates what the pass produced (its annotations), run after it by the pass manager.
    check: Optional[Callable[[Graph, PassContext], None]] = None

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        return self.run(graph, ctx)


REGISTRY: dict[str, Pass] = {}


def register(p: Pass) -> Pass:
    """Make a pass nameable from config (`compiler.passes=[...]`)."""
    if p.name in REGISTRY:
        raise ValueError(f"compiler pass {p.name!r} is registered twice")
    REGISTRY[p.name] = p
    return p


def providers(annotation: str) -> list[str]:
    """Registered passes that provide `annotation` (for error messages that say what to add)."""
    return sorted(name for name, p in REGISTRY.items() if annotation in p.provides)


def rewritten(graph: Graph) -> Graph:
    """A copy of `graph` for a pass that rewrites nodes: derived annotations are dropped, facts kept."""
    out = graph.copy()
    for key in DERIVED:
        out.annotations.pop(key, None)
    return out
