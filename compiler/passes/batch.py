"""`batch`: group nodes of one model that become ready together into one generate call.

Only nodes that need a model call are batched (host nodes and fused-chain parts have no call of their own).
"Ready together" = same topological level (no node on a level depends on another on it). Each
(level, model) group, ordered by estimated prompt length (graph order among equals: a left-padded
prefill computes every row at its longest prompt, so similar lengths waste the least), is cut greedily
into calls of at most `max_call_size` nodes, of which at most `max_batch_size` decode at once: the rest
join as rows finish (continuous refill, `compiler.cost.admit_rows`), so one long answer never decodes
alone while work waits. On a server (`Engine.concurrency`), at most its concurrency are in flight at once. Calls are also bounded by memory: a call's left-padded KV (live rows x its
longest prompt + output) plus its prefill workspace must fit in the budget left after the runtime's base
and its own model's weights (and its KV under `max_batch_kv_bytes` if set). A call the cost model says
is slower than its nodes one by one is split into singles. The residency pass later reserves each model's
largest call next to its weights, so any call can run whatever else is resident.
Output: `annotations["batches"]`, a tuple of `Batch` in level order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from compiler.config import PassContext
from compiler.cost import CostModel
from compiler.errors import CompileError, MemoryBudgetError
from compiler.ir import Graph
from compiler.levels import topo_levels
from compiler.passes.registry import Pass, register


@dataclass(frozen=True)
class Batch:
    """One planned generate call: same model, same level, memory within the limit."""

    index: int
    model: str
    level: int
    nodes: tuple[str, ...]
    bytes: int  # memory the call holds beside its model's weights: KV + prefill workspace
    est_s: float
    slots: int = 0  # rows decoding at once; 0 = all nodes at once (no refill)
    prefill_saved: int = 0  # prompt tokens the engine's prefix cache saves this call (the `prefix` pass)

    def dump(self) -> str:
        slots = f" slots={self.slots}" if self.slots else ""
        slots += f" prefill_saved={self.prefill_saved}" if self.prefill_saved else ""
        return (f"batch {self.index} level={self.level} model={self.model} bytes={self.bytes}{slots} "
                f"est={self.est_s:.4g}s nodes({', '.join(self.nodes)})")


def batch(graph: Graph, ctx: PassContext) -> Graph:
    out = graph.copy()
    out.annotations["batches"] = make_batches(graph, ctx, ctx.config.max_batch_size, ctx.config.max_call_size)
    return out


def kv_limit(cost: CostModel, model: str, budget: Optional[int], cap: Optional[int]) -> float:
    """Bytes one call of `model` may hold: the budget minus the base and its weights, and at most the cap."""
    limit = math.inf if budget is None else budget - cost.base_bytes - cost.cost(model).weight_bytes
    return limit if cap is None else min(limit, cap)


def make_batches(graph: Graph, ctx: PassContext, max_size: int, call_size: Optional[int] = None) -> tuple[Batch, ...]:
    """Calls of at most `call_size` nodes (None: `max_size`), at most `max_size` of them decoding at once."""
    call_size = max(max_size, call_size or max_size)
    cost, budget, cap = ctx.cost, ctx.config.planning_budget, ctx.config.max_batch_kv_bytes
    levels = topo_levels(graph, ctx.done)
    groups: dict[tuple[int, str], list[str]] = {}
    tokens_of: dict[str, tuple[int, int]] = {}
    worst: dict[str, tuple[int, str]] = {}  # model -> (largest single-node call bytes, its node)
    for nid, node in graph.nodes.items():  # graph order within a group: deterministic, insertion-stable
        if not node.needs_model or nid in ctx.done:
            continue  # a host node, a part answered by its fused node's call, or answered by an earlier increment
        model = cost.model_of(node)
        groups.setdefault((levels[nid], model), []).append(nid)
        p, o = tokens_of[nid] = cost.node_tokens(node, graph)
        alone = cost.batch_bytes(model, [(p, o)])
        if alone > worst.get(model, (-1, ""))[0]:
            worst[model] = (alone, nid)
    if budget is not None and worst:
        _check_fits(cost, worst, budget)

    batches: list[Batch] = []
    for level, model in sorted(groups, key=lambda key: key[0]):  # stable: models in first-appearance order
        limit = kv_limit(cost, model, budget, None)
        engine = cost.engine(model)
        live_cap = min(max_size, engine.concurrency) if engine.remote else max_size  # a server's concurrency budget
        kv_cap = math.inf if cap is None else cap
        kv_per_token = cost.cost(model).kv_bytes_per_token
        workspace_per_token = cost.cost(model).workspace_bytes_per_token
        members: list[str] = []
        tokens: list[tuple[int, int]] = []
        longest_p = longest_o = 0

        def close() -> None:
            slots = min(live_cap, len(members))
            together = cost.batch_seconds(model, tokens, slots)
            # guarded (cascade) rows: time expected at their escalation rate; bytes planned for all of them
            share = cost.expected_share([graph.nodes[n] for n in members])
            if len(members) > 1 and together > sum(cost.batch_seconds(model, [t]) for t in tokens):
                # the measured kernels make this batch size slower than its calls one by one: don't batch
                for nid, t in zip(members, tokens):
                    batches.append(Batch(len(batches), model, level, (nid,), cost.batch_bytes(model, [t]),
                                         cost.batch_seconds(model, [t]) * cost.expected_share([graph.nodes[nid]])))
            elif members:
                batches.append(Batch(len(batches), model, level, tuple(members),
                                     cost.batch_bytes(model, tokens, slots), together * share,
                                     slots if slots < len(members) else 0))

        for nid in sorted(groups[(level, model)], key=lambda n: tokens_of[n][0]):  # stable
            p, o = tokens_of[nid]
            rows = min(len(members) + 1, live_cap)  # what batch_kv_bytes / batch_workspace_bytes would say, O(1)
            kv = rows * (max(longest_p, p) + max(longest_o, o)) * kv_per_token
            workspace = rows * max(longest_p, p) * workspace_per_token
            if members and (len(members) >= call_size or kv + workspace > limit or kv > kv_cap):
                close()
                members, tokens, longest_p, longest_o = [], [], 0, 0
            members.append(nid)
            tokens.append((p, o))
            longest_p, longest_o = max(longest_p, p), max(longest_o, o)
        close()
    return tuple(batches)


def _check_fits(cost: CostModel, worst: dict[str, tuple[int, str]], budget: int) -> None:
    """Every model must fit with its largest single node; report the model needing the most bytes, with the
    bytes it needs (= the smallest budget that would work for it)."""
    base = cost.base_bytes
    needs = {m: (base + cost.cost(m).weight_bytes + kv, m, nid) for m, (kv, nid) in worst.items()}
    need, model, nid = max(needs.values(), key=lambda t: t[0])
    if need > budget:
        weights = cost.cost(model).weight_bytes
        raise MemoryBudgetError(model, need, budget, f"runtime base {base:,} + weights {weights:,} + KV and "
                                f"workspace {need - weights - base:,} for node {nid!r} alone")


def check_batches(graph: Graph, batches: tuple[Batch, ...], cost: CostModel,
                  done: frozenset[str] = frozenset()) -> None:
    """Every node that needs a model call (and no earlier plan increment answers) in exactly one batch of its own
    model; CompileError names the first violation."""
    seen: dict[str, int] = {}
    for b in batches:
        for nid in b.nodes:
            if nid not in graph.nodes:
                raise CompileError(f"batch {b.index} names node {nid!r}, which is not in the graph "
                                   "(stale batches: run `batch` after passes that rewrite nodes)")
            if nid in seen:
                raise CompileError(f"node {nid!r} is in batches {seen[nid]} and {b.index}")
            if cost.model_of(graph.nodes[nid]) != b.model:
                raise CompileError(f"batch {b.index} runs {b.model!r} but node {nid!r} needs "
                                   f"{cost.model_of(graph.nodes[nid])!r}")
            seen[nid] = b.index
            if not graph.nodes[nid].needs_model or nid in done:
                raise CompileError(f"batch {b.index} names node {nid!r}, which needs no model call of its own")
    missing = [nid for nid, node in graph.nodes.items() if nid not in seen and node.needs_model and nid not in done]
    if missing:
        raise CompileError(f"{len(missing)} node(s) in no batch, e.g. {missing[:3]}")


register(Pass("batch", batch, provides=frozenset({"batches"}),
              check=lambda graph, ctx: check_batches(graph, graph.annotations["batches"], ctx.cost, ctx.done)))
