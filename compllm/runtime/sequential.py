"""The paper's latency baseline: one node at a time in topological order, no batching."""
from __future__ import annotations

import logging

from compiler.ir import Graph
from compllm.runtime.context import ExecutionContext
from compllm.runtime.result import NodeResult
from compllm.runtime.trace import StepRecord

log = logging.getLogger(__name__)


class SequentialExecutor:
    needs_plan = False

    def __init__(self, name: str = "sequential"):
        self.name = name
        self.step_records: list[StepRecord] = []

    def run(self, graph: Graph, ctx: ExecutionContext, plan=None, progress=None) -> dict[str, NodeResult]:
        """`plan` is ignored: this baseline deliberately uses none of the compiler's decisions."""
        results: dict[str, NodeResult] = {}
        self.step_records = []
        for node_id in graph.topo_order():
            node = graph.nodes[node_id]
            res = results[node_id] = ctx.new_result(node)
            res.start = ctx.now()
            blocked = ctx.blocked_by(node, results)
            passthrough = ctx.passthrough(node, results)
            if blocked:
                res.status, res.error = "skipped", blocked
            elif passthrough is not None:
                res.status, res.answer = "ok", passthrough
            else:
                request = ctx.request(graph, node, results)
                res.prompt = request.messages[-1]["content"]
                (outcome,) = ctx.generate(res.model, [request], node_id)
                ctx.record(res, outcome)
                if not res.ok:
                    log.error("node %s failed: %s", node_id, res.error)
            res.end = ctx.now()
            if res.prompt:
                self.step_records.append(StepRecord(f"call:{node_id}", "generate", res.model, 0, res.start, res.end,
                                                    (node_id,)))
            if progress is not None:
                progress.update(1)
        return results
