"""`cascade`: a part goes to its expert's (small) model first and to a bigger model only when that draft is unsure.

The escalation is planned, not improvised: for each cascading sub-query `n` the pass adds a draft node `n~draft`
(the original work, unchanged) and turns `n` itself into an ESCALATE node on `cascade.to_model` that reads the
draft and carries a `Guard` (draft confidence < threshold). `n` keeps its id, so every consumer (other parts,
the query's sink) keeps reading `n` and gets the big model's answer when it ran, the draft's otherwise. Batching,
residency and lowering then treat the escalate node like any other node of the big model: its calls, the big
model's load and both models' memory are in the plan whatever the drafts say (memory is planned for every
escalation, time for the expected rate, see `CostModel.expected_share`). The runtime only evaluates the guard.

Runs after `fuse` (a fused call's reply has no per-part confidence: fused nodes and their parts never cascade)
and before `batch`.
"""
from __future__ import annotations

from compiler.config import PassContext
from compiler.errors import ConfigError
from compiler.ir import Graph, Guard, NodeKind
from compiler.passes.registry import DERIVED, Pass, register, rewritten

DRAFT_SUFFIX = "~draft"


def draft_id(node_id: str) -> str:
    return node_id + DRAFT_SUFFIX


def cascade(graph: Graph, ctx: PassContext) -> Graph:
    policy = ctx.config.cascade
    if policy is None:
        return graph
    cost = ctx.cost
    if policy.to_model not in cost.models:
        raise ConfigError(f"cascade.to_model {policy.to_model!r} is not a model the compiler plans for; known: "
                          f"{', '.join(sorted(cost.models))} (add it: +model@models.{policy.to_model}=<model config>)")
    wanted = set(policy.experts)
    unknown = wanted - set(cost.expert_model)
    if unknown:
        raise ConfigError(f"cascade.experts names unknown experts {sorted(unknown)}; known: "
                          f"{', '.join(sorted(cost.expert_model))}")

    def cascades(node) -> bool:
        return (node.kind is NodeKind.SUBQUERY and node.needs_model and not node.fused_from and not node.model
                and node.id not in ctx.done and (not wanted or node.expert in wanted)
                and cost.model_of(node) != policy.to_model and draft_id(node.id) not in graph.nodes)

    chosen = [nid for nid, node in graph.nodes.items() if cascades(node)]
    if not chosen:
        return graph
    out = rewritten(graph)
    out.nodes = {}
    guard_rate = policy.rate
    escalations: dict[str, str] = {}
    for nid, node in graph.nodes.items():
        if nid not in escalations and nid in chosen:
            draft = node.with_(id=draft_id(nid))
            out.nodes[draft.id] = draft
            out.nodes[nid] = node.with_(
                kind=NodeKind.ESCALATE, model=policy.to_model, inputs={**node.inputs, "#draft": draft.id},
                guard=Guard(draft.id, policy.threshold, guard_rate))
            escalations[nid] = draft.id
        else:
            out.nodes[nid] = node
    out.annotations["cascade"] = {**graph.annotations.get("cascade", {}), **escalations}
    return out


register(Pass("cascade", cascade, provides=frozenset({"cascade"}), invalidates=DERIVED))
