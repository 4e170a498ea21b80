"""`prefix`: rows sharing a prompt prefix run together, and the plan counts the prefill the engine's cache saves.

Every call of an expert starts with the same prefix (chat-template head + the expert's system prompt:
`CostModel.prefix_tokens`). On an engine that keeps shared prefixes (`Engine.prefix_cache`: llama.cpp in process,
a server with prefix caching), a call's rows of one expert are ordered next to each other (in-process, rows join
in plan order, and the rows sharing a prefix reuse it while it is fresh; a server gets the requests sharing a
prefix together, so its cache hits), and the prefix is computed once per call, or not at all when an earlier call
of the same model (in plan order) already computed it: the engine keeps it. Each call's estimate drops by the
saved prefill (`Batch.prefill_saved` tokens x the model's prefill seconds per token); engines without a prefix
cache are left exactly as the `batch` pass made them.

Contract: requires `batches`; provides `prefixes` (per batch: the (key, rows, tokens) groups it shares) and
rewrites `batches` in place (same calls, same nodes); invalidates `schedule` and `residency`, so the pass manager
refuses a pipeline that schedules before the rows are final.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from compiler.config import PassContext
from compiler.cost import CostModel
from compiler.errors import CompileError
from compiler.ir import Graph
from compiler.passes.batch import Batch, check_batches
from compiler.passes.registry import Pass, register


@dataclass(frozen=True)
class PrefixGroup:
    """Rows of one call sharing one prefix."""

    key: str  # "<model>/<expert>"
    rows: int
    tokens: int  # prefix length
    cached: bool  # an earlier call of this model computed it: no row computes it


@dataclass(frozen=True)
class Prefixes:
    """The `prefixes` annotation: batch index -> the prefix groups of its rows (engines with a prefix cache)."""

    groups: dict[int, tuple[PrefixGroup, ...]]

    def dump(self) -> str:
        lines = [f"  batch {i}: " + ", ".join(f"{g.key} x{g.rows} ({g.tokens} tokens{', cached' if g.cached else ''})"
                                               for g in groups) for i, groups in self.groups.items() if groups]
        return "prefixes:" + ("".join(f"\n{line}" for line in lines) or " none (no engine with a prefix cache)")


def plan_prefixes(graph: Graph, batches: tuple[Batch, ...], cost: CostModel
                  ) -> tuple[tuple[Batch, ...], Prefixes]:
    """The batches with their rows grouped by prefix and their saved prefill counted, and each batch's groups."""
    out: list[Batch] = []
    groups_of: dict[int, tuple[PrefixGroup, ...]] = {}
    cached: dict[str, set[str]] = {}  # model -> prefix keys an earlier call left in its engine's cache
    for b in batches:
        if not cost.engine(b.model).prefix_cache:
            out.append(b)
            continue
        prefixes = {nid: cost.prefix_of(graph.nodes[nid]) for nid in b.nodes}
        first: dict[str, int] = {}  # key -> rank of its first row: groups keep the batch pass's order
        for nid in b.nodes:
            first.setdefault(prefixes[nid][0], len(first))
        nodes = tuple(sorted(b.nodes, key=lambda nid: first[prefixes[nid][0]]))  # stable within a group
        seen = cached.setdefault(b.model, set())
        counts: dict[tuple[str, int], int] = {}
        for nid in nodes:
            counts[prefixes[nid]] = counts.get(prefixes[nid], 0) + 1
        groups = tuple(PrefixGroup(key, n, tokens, key in seen) for (key, tokens), n in counts.items() if key)
        saved = cost.prefill_saved(b.model, [prefixes[nid] for nid in nodes], seen)
        seen.update(g.key for g in groups)
        est = max(b.est_s - saved * cost.cost(b.model).prefill_s_per_token, 0.0)
        out.append(replace(b, nodes=nodes, est_s=est, prefill_saved=saved))
        groups_of[b.index] = groups
    return tuple(out), Prefixes(groups_of)


def prefix(graph: Graph, ctx: PassContext) -> Graph:
    out = graph.copy()
    out.annotations["batches"], out.annotations["prefixes"] = plan_prefixes(graph, graph.annotations["batches"],
                                                                            ctx.cost)
    return out


def check_prefixes(graph: Graph, ctx: PassContext) -> None:
    """Still every node in one batch of its model; no call saves more prompt tokens than its rows have."""
    batches = graph.annotations["batches"]
    check_batches(graph, batches, ctx.cost, ctx.done)
    for b in batches:
        prompt = sum(ctx.cost.node_tokens(graph.nodes[nid], graph)[0] for nid in b.nodes)
        if b.prefill_saved < 0 or b.prefill_saved > prompt:
            raise CompileError(f"batch {b.index} saves {b.prefill_saved} prompt tokens of its {prompt}")


register(Pass("prefix", prefix, requires=frozenset({"batches"}), provides=frozenset({"prefixes"}),
              invalidates=frozenset({"schedule", "residency"}), check=check_prefixes))
