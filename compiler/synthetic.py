"""Random but realistic workloads (graphs + cost models), for property tests, benchmarks and scale studies.

Shape: many queries of a few sub-queries each, each sub-query depending on some earlier ones of its
query, routed to one of several experts that share a few models; a fraction of sub-query texts come
from a shared pool, so identical work recurs across queries as it does in real batches.
Deterministic for a given `random.Random` state.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

from compiler.build import FinalAnswer, RoutedSubQuery, add_query
from compiler.cost import CostModel, ModelCost
from compiler.ir import AGGREGATOR, Graph


def random_graph(rng: random.Random, experts: Sequence[str], *, n_nodes: Optional[int] = None,
                 n_queries: Optional[int] = None, min_sub: int = 2, max_sub: int = 6, dep_prob: float = 0.3,
                 shared_prob: float = 0.15, shared_pool: int = 8, output_tokens: Sequence[int] = (64, 96, 128),
                 aggregator_tokens: int = 192, synthesized: float = 0.5) -> Graph:
    """Queries until `n_queries` are built or the graph has `n_nodes` nodes (whichever is given); a share
    `synthesized` of them has its final answer written by the aggregator model, the rest joined on the host."""
    if (n_nodes is None) == (n_queries is None):
        raise ValueError("give exactly one of n_nodes, n_queries")
    shared = [f"Shared question {i} about a common fact?" for i in range(max(1, shared_pool))]
    experts = list(experts)
    graph = Graph()
    q = 0
    while (len(graph) < n_nodes) if n_nodes is not None else (q < n_queries):  # type: ignore[operator]
        subs = []
        for i in range(1, rng.randint(min_sub, max_sub) + 1):
            deps = tuple(d for d in range(1, i) if rng.random() < dep_prob)
            expert = rng.choice(experts)
            if rng.random() < shared_prob:  # a shared text: identical across queries when its deps are too
                k = rng.randrange(len(shared))
                text = shared[k] + "".join(f" given #{d}" for d in deps)
                expert = experts[k % len(experts)]  # routing is deterministic: same text, same expert
            else:
                text = f"Query {q} step {i}: " + " ".join(f"#{d}" for d in deps) + " explain."
            subs.append(RoutedSubQuery(i, text, deps, expert, max_new_tokens=rng.choice(list(output_tokens))))
        final = FinalAnswer.model if rng.random() < synthesized else FinalAnswer.join
        add_query(graph, f"q{q}", f"Original question number {q}?", subs, AGGREGATOR, aggregator_tokens, final=final)
        q += 1
    return graph


def random_cost_model(rng: random.Random, experts: Sequence[str], n_models: int, *, uniform: bool = False,
                      weight_bytes: tuple[int, int] = (10**8, 4 * 10**9),
                      kv_bytes_per_token: tuple[int, int] = (0, 64 * 1024)) -> CostModel:
    """`n_models` aliases with random sizes (`uniform`: all the same weights and no KV), experts spread over them;
    the aggregator runs on a random one of them."""
    aliases = [f"m{i}" for i in range(n_models)]
    same = rng.randint(*weight_bytes)
    models = {}
    for alias in aliases:
        models[alias] = ModelCost(
            weight_bytes=same if uniform else rng.randint(*weight_bytes),
            kv_bytes_per_token=0 if uniform else rng.randint(*kv_bytes_per_token),
            prefill_s_per_token=rng.uniform(1e-5, 1e-4),
            decode_s_per_token=rng.uniform(2e-3, 2e-2),
            call_overhead_s=rng.uniform(0, 0.01),
        )
    mapping = {e: rng.choice(aliases) for e in experts}
    mapping[AGGREGATOR] = rng.choice(aliases)
    return CostModel(models, mapping)
