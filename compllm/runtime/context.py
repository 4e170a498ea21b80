"""What every executor needs to turn a node into a model call, shared so policies differ only in scheduling."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

from compiler.ir import AnswerType, Graph, Node, NodeKind
from compllm.backends.base import GenerationRequest
from compllm.backends.pool import ModelPool
from compllm.experts import Expert
from compllm.runtime.faults import CallOutcome, RetryPolicy, generate_with_retry
from compllm.runtime.prompts import Aggregator, fill, subquery_request
from compllm.runtime.result import NodeResult

AGGREGATOR = "aggregator"  # the expert name aggregate nodes carry in the IR


@dataclass
class ExecutionContext:
    pool: ModelPool
    experts: Mapping[str, Expert]
    aggregator: Aggregator
    max_answer_chars: int = 400
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    t0: float = field(default_factory=time.perf_counter)

    def generate(self, model: str, requests: list[GenerationRequest], what: str, slots: int = 0) -> list[CallOutcome]:
        """One (batched) model call under the retry/timeout policy: one outcome per request, never an exception
        for a recoverable fault (errors, timeouts, out-of-memory, empty text). `slots` (from the plan): at most
        that many rows decode at once, the rest join as rows finish; 0 = all at once."""
        return generate_with_retry(lambda batch: self.pool.get(model).generate(batch, max_live_rows=slots or None),
                                   requests, self.retry, what)

    @staticmethod
    def record(res: NodeResult, outcome: CallOutcome) -> None:
        """Copy a call outcome into the node's result: its answer and token counts, or why it failed."""
        res.attempts = outcome.attempts
        gen = outcome.generation
        if gen is None:
            res.status, res.error = "failed", outcome.error
            return
        res.status, res.answer = "ok", gen.text
        res.prompt_tokens, res.output_tokens = gen.prompt_tokens, gen.output_tokens
        res.batch_size, res.finish_reason = gen.batch_size, gen.finish_reason

    def model_of(self, node: Node) -> str:
        return self.aggregator.model if node.kind is NodeKind.AGGREGATE else self.experts[node.expert].model

    def new_result(self, node: Node) -> NodeResult:
        qid = node.provenance.query_id if node.provenance else node.id.split(":")[0]
        return NodeResult(node.id, qid, node.kind.value, node.expert, self.model_of(node))

    def request(self, graph: Graph, node: Node, results: Mapping[str, NodeResult]) -> GenerationRequest:
        answers = {nid: r.answer for nid, r in results.items() if r.ok}
        if node.kind is NodeKind.AGGREGATE:
            parts = []
            for label, parent_id in node.inputs.items():
                parent, res = graph.nodes[parent_id], results.get(parent_id)
                answer = res.answer if res and res.ok else f"(no answer: {res.error if res else 'not run'})"
                parts.append((label.lstrip("#"), fill(parent, answers, self.max_answer_chars), answer))
            chained = any(graph.nodes[p].inputs for p in node.parents)
            return self.aggregator.request(node.template, parts, chained)
        return subquery_request(node, self.experts[node.expert], answers, self.max_answer_chars)

    def passthrough(self, node: Node, results: Mapping[str, NodeResult]) -> str | None:
        """An aggregate answered without a model call: a LIST aggregate (the query numbered its questions) is its
        answers as numbered lines; with skip_single, an aggregate over one successful sub-query is its answer."""
        if node.kind is NodeKind.AGGREGATE and node.answer_type is AnswerType.LIST:
            lines = []
            for label, parent in node.inputs.items():
                res = results.get(parent)
                body = " ".join(res.answer.split()) if res and res.ok else \
                    f"(no answer: {res.error or res.status if res else 'not run'})"
                lines.append(f"Question {label.lstrip('#')}: {body}")
            return "\n".join(lines)
        if node.kind is NodeKind.AGGREGATE and self.aggregator.skip_single and len(node.inputs) == 1:
            only = results.get(next(iter(node.inputs.values())))
            if only is not None and only.ok:
                return only.answer
        return None

    def blocked_by(self, node: Node, results: Mapping[str, NodeResult]) -> str | None:
        """A sub-query whose parent failed or was skipped cannot run: say which parent."""
        if node.kind is NodeKind.AGGREGATE:
            return None  # the aggregator answers from whatever exists
        for parent in node.parents:
            res = results.get(parent)
            if res is None or not res.ok:
                return f"depends on {parent}, which {res.status if res else 'did not run'}"
        return None

    def now(self) -> float:
        return time.perf_counter() - self.t0
