"""The paper's latency baseline: one node at a time in topological order, no batching."""
from __future__ import annotations

import logging

from compiler.ir import Graph
from compllm.backends.base import BackendError
from compllm.runtime.context import ExecutionContext
from compllm.runtime.result import NodeResult

log = logging.getLogger(__name__)


class SequentialExecutor:
    def __init__(self, name: str = "sequential"):
        self.name = name

    def run(self, graph: Graph, ctx: ExecutionContext, progress=None) -> dict[str, NodeResult]:
        results: dict[str, NodeResult] = {}
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
                try:
                    gen = ctx.pool.get(res.model).generate([request])[0]
                except (BackendError, RuntimeError, ValueError) as exc:
                    log.error("node %s failed: %s", node_id, exc)
                    res.status, res.error = "failed", f"{type(exc).__name__}: {exc}"
                else:
                    res.status, res.answer = "ok", gen.text
                    res.prompt_tokens, res.output_tokens = gen.prompt_tokens, gen.output_tokens
                    res.batch_size, res.finish_reason = gen.batch_size, gen.finish_reason
            res.end = ctx.now()
            if progress is not None:
                progress.update(1)
        return results
