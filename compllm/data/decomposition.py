"""How close a predicted decomposition is to a gold one (FanOutQA's human DAGs): nodes and dependency edges.

Nodes: predicted and gold sub-questions are paired one-to-one by maximising the total token F1 (after
`normalize`) of pairs whose F1 reaches `threshold`, with scipy's `linear_sum_assignment` (scipy and networkx
come with compllm's dependencies sentence-transformers and torch). Token F1 is lexical: templated siblings ("batting hand of Pat
Burrell" / "... of Mark Mulder") score high against each other; the optimal assignment still pairs each with
its own, but a paraphrase with few shared words may stay unmatched.

Edges are compared as *reachability*, so transitive edges neither help nor hurt: for each side, take which
matched node can reach which (paths may pass through unmatched nodes), reduce that relation to its
transitive reduction, and count an edge as correct when the other side's reachability implies it. Two DAGs
that order the matched sub-questions the same way score 1.0 whether or not they list redundant edges, and
a predicted edge A->C is right when the gold has A->B->C even if B was not predicted.
"""
from __future__ import annotations

from typing import Any, Sequence

import networkx as nx
from scipy.optimize import linear_sum_assignment

from compllm.data.fanoutqa import GoldSubQuestion
from compllm.data.textmetrics import normalize, token_f1

DEFAULT_THRESHOLD = 0.5


def _similarity(a: str, b: str) -> float:
    return token_f1(a, [b]) if normalize(a) and normalize(b) else 0.0


def _pred_graph(pred: Sequence[tuple[str, Sequence[int]]]) -> tuple[nx.DiGraph, int]:
    """Edges dependency -> dependent over 0-based nodes; self and out-of-range references are dropped."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(pred)))
    invalid = 0
    for i, (_, deps) in enumerate(pred):
        for d in deps:
            if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= len(pred) or d - 1 == i:
                invalid += 1
            else:
                g.add_edge(d - 1, i)
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError(f"predicted decomposition has a dependency cycle: {nx.find_cycle(g)} (0-based)")
    return g, invalid


def _gold_graph(gold: Sequence[GoldSubQuestion]) -> nx.DiGraph:
    index = {s.id: i for i, s in enumerate(gold)}
    if len(index) != len(gold):
        raise ValueError("gold decomposition has duplicate ids")
    g = nx.DiGraph()
    g.add_nodes_from(range(len(gold)))
    for i, s in enumerate(gold):
        for d in s.depends_on:
            if d not in index:
                raise ValueError(f"gold sub-question {s.id} depends on unknown id {d!r}")
            g.add_edge(index[d], i)
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("gold decomposition has a dependency cycle")
    return g


def _reduced_reachability(g: nx.DiGraph, nodes: list[int]) -> nx.DiGraph:
    closure = nx.transitive_closure_dag(g)
    return nx.transitive_reduction(closure.subgraph(nodes).copy())


def _prf(correct_p: int, n_p: int, correct_r: int, n_r: int) -> tuple[float, float, float]:
    precision = correct_p / n_p if n_p else 1.0  # no edge claimed: nothing wrong claimed
    recall = correct_r / n_r if n_r else 1.0  # no edge to find
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def decomposition_quality(pred: Sequence[tuple[str, Sequence[int]]], gold: Sequence[GoldSubQuestion],
                          threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Node and edge agreement of a predicted decomposition with a gold DAG.

    `pred`: (sub-question text, 1-based indices of the predicted sub-questions it depends on), e.g. from the
    decomposer's `SubQuery(text, depends_on)`. Returns counts, node precision/recall/F1 of the matching, the
    matching itself (1-based pred index, gold id, F1), and edge precision/recall/F1 over matched nodes; the
    edge scores are None when fewer than two nodes matched (there is no pair to order).
    """
    pred_g, invalid = _pred_graph(pred)
    gold_g = _gold_graph(gold)
    pairs: list[tuple[int, int, float]] = []
    if pred and gold:
        # pairs under the threshold weigh 0, so junk overlaps ("in", "what") cannot outbid a real match
        sim = [[x if x >= threshold else 0.0 for x in (_similarity(text, g.question) for g in gold)]
               for text, _ in pred]
        rows, cols = linear_sum_assignment(sim, maximize=True)
        pairs = [(int(r), int(c), float(sim[r][c])) for r, c in zip(rows, cols)]
    matched = [(p, g, s) for p, g, s in pairs if s >= threshold and s > 0.0]
    n_pred, n_gold, n_match = len(pred), len(gold), len(matched)
    node_p, node_r, node_f1 = _prf(n_match, n_pred, n_match, n_gold)
    out: dict[str, Any] = {
        "n_pred": n_pred, "n_gold": n_gold, "n_matched": n_match, "threshold": threshold,
        "node_precision": node_p if n_pred else 0.0, "node_recall": node_r if n_gold else 0.0,
        "node_f1": node_f1 if n_pred and n_gold else 0.0,
        "mean_matched_f1": sum(s for *_, s in matched) / n_match if n_match else 0.0,
        "matching": [(p + 1, gold[g].id, round(s, 4)) for p, g, s in sorted(matched)],
        "invalid_pred_deps": invalid,
        "n_pred_edges": None, "n_gold_edges": None, "n_correct_pred_edges": None, "n_found_gold_edges": None,
        "edge_precision": None, "edge_recall": None, "edge_f1": None,
    }
    if n_match < 2:
        return out
    to_gold = {p: g for p, g, _ in matched}
    to_pred = {g: p for p, g in to_gold.items()}
    pred_rel = _reduced_reachability(pred_g, list(to_gold))
    gold_rel = _reduced_reachability(gold_g, list(to_pred))
    pred_reach, gold_reach = nx.transitive_closure_dag(pred_g), nx.transitive_closure_dag(gold_g)
    correct_p = sum(gold_reach.has_edge(to_gold[a], to_gold[b]) for a, b in pred_rel.edges)
    correct_r = sum(pred_reach.has_edge(to_pred[a], to_pred[b]) for a, b in gold_rel.edges)
    p, r, f1 = _prf(correct_p, pred_rel.number_of_edges(), correct_r, gold_rel.number_of_edges())
    out.update(n_pred_edges=pred_rel.number_of_edges(), n_gold_edges=gold_rel.number_of_edges(),
               n_correct_pred_edges=correct_p, n_found_gold_edges=correct_r,
               edge_precision=p, edge_recall=r, edge_f1=f1)
    return out
