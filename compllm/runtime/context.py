"""What an executor needs to turn a plan step's nodes into a model call and record the outcome.

It makes no decisions: which nodes share a call, on which model, and which nodes need no call at all come from
the plan; this module only builds the prompts, calls the backend under the experts' retry policies, and
records what happened.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from compiler.build import PASSAGES_LABEL
from compiler.ir import Graph, Node, NodeKind
from compllm.backends.base import GenerationRequest, OnText
from compllm.backends.pool import ModelPool
from compllm.experts import Expert
from compllm.runtime.faults import CallOutcome, RetryPolicy, generate_with_retry
from compllm.runtime.prompts import Aggregator, fill, subquery_request
from compllm.runtime.result import NodeResult


@dataclass
class ExecutionContext:
    pool: ModelPool
    experts: Mapping[str, Expert]
    aggregator: Aggregator
    max_answer_chars: int = 400
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    t0: float = field(default_factory=time.perf_counter)
    knowledge: Mapping[str, Any] = field(default_factory=dict)  # source key -> loaded Retriever (compllm.knowledge)

    def generate(self, model: str, requests: Sequence[GenerationRequest], policies: Sequence[RetryPolicy],
                 what: str, slots: int = 0, on_text: OnText | None = None) -> list[CallOutcome]:
        """One (batched) call on a resident model under the requests' retry policies: one outcome per request,
        never an exception. `slots` (from the plan): at most that many rows decode at once; 0 = all at once.
        `on_text(request index, text so far)`: stream the replies (a retry streams its requests again)."""
        index = {id(r): i for i, r in enumerate(requests)}

        def call(batch: list[GenerationRequest], cancel: threading.Event):
            streamed = None if on_text is None else (lambda row, text: on_text(index[id(batch[row])], text))
            return self.pool.resident(model).generate(batch, max_live_rows=slots or None, cancel=cancel,
                                                      on_text=streamed)

        return generate_with_retry(call, list(requests), policies, what)

    def policy(self, node: Node) -> RetryPolicy:
        """The node's expert's own retry policy where it has one, else the run's."""
        expert = self.experts.get(node.expert)
        return expert.retry if expert is not None and expert.retry is not None else self.retry

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
        res.confidence = gen.confidence

    def new_result(self, node: Node, model: str) -> NodeResult:
        qid = node.provenance.query_id if node.provenance else ""
        return NodeResult(node.id, qid, node.kind.value, node.expert, model)

    def request(self, graph: Graph, node: Node, results: Mapping[str, NodeResult]) -> GenerationRequest:
        answers = {nid: r.answer for nid, r in results.items() if r.ok}
        if node.kind is NodeKind.AGGREGATE:
            parts = []
            for label, parent_id in node.inputs.items():
                parent, res = graph.nodes[parent_id], results.get(parent_id)
                answer = res.answer if res and res.ok else f"(no answer: {res.error if res else 'not run'})"
                parts.append((label.lstrip("#"), fill(parent, answers, self.max_answer_chars), answer))
            chained = any(set(graph.nodes[p].inputs) - {PASSAGES_LABEL} for p in node.parents)
            return self.aggregator.request(node.template, parts, chained)
        if node.guard is not None:  # an escalation asks exactly the draft's question: the draft is the guard's only
            node = node.with_(inputs={k: p for k, p in node.inputs.items() if p != node.guard.source})
        passages = None
        if PASSAGES_LABEL in node.inputs:
            passages = json.loads(answers.get(node.inputs[PASSAGES_LABEL], "[]") or "[]")
        return subquery_request(node, self.experts[node.expert], answers, self.max_answer_chars, passages)

    def lookup(self, nodes: Sequence[Node], results: Mapping[str, NodeResult]) -> list[tuple[str, str, str]]:
        """A retrieve step's nodes looked up in their experts' sources, one search per (source, topics, k):
        (question, passages as JSON, error) per node, in order. The question is the node's template with its
        parents' answers filled in (unquoted: the index reads words, not quotes)."""
        answers = {nid: r.answer for nid, r in results.items() if r.ok}
        out: list[tuple[str, str, str]] = [("", "", "")] * len(nodes)
        groups: dict[tuple, list[int]] = {}
        for i, node in enumerate(nodes):
            cfg = self.experts[node.expert].knowledge
            if cfg is None or cfg.source_key() not in self.knowledge:
                out[i] = ("", "", f"expert {node.expert!r} has no loaded knowledge source")
                continue
            groups.setdefault((cfg.source_key(), tuple(cfg.topics), cfg.k), []).append(i)
        for (key, topics, k), rows in groups.items():
            questions = [fill(nodes[i], answers, self.max_answer_chars).replace("«", "").replace("»", "")
                         for i in rows]
            try:
                found = self.knowledge[key].search(questions, k, topics)
            except Exception as exc:  # an index failure fails its nodes (their readers are skipped), never the run
                for i, q in zip(rows, questions):
                    out[i] = (q, "", f"lookup in {key!r} failed: {type(exc).__name__}: {exc}")
                continue
            for i, q, hits in zip(rows, questions, found):
                out[i] = (q, json.dumps([h.to_dict() for h in hits], ensure_ascii=False), "")
        return out

    def blocked_by(self, node: Node, results: Mapping[str, NodeResult]) -> str | None:
        """A sub-query whose parent failed or was skipped cannot run: say which parent (an escalation runs
        whatever became of the draft its guard reads: a failed draft is what it is there for)."""
        if node.kind is NodeKind.AGGREGATE:
            return None  # the final answer is made from whatever exists, and says what is missing
        for parent in node.parents:
            if node.guard is not None and parent == node.guard.source:
                continue
            res = results.get(parent)
            if res is None or not res.ok:
                return f"depends on {parent}, which {res.status if res else 'did not run'}"
        return None

    @staticmethod
    def settle_guard(node: Node, res: NodeResult, draft: NodeResult | None) -> bool:
        """Evaluate an escalate node's planned guard on its draft's result: True = run the node (escalate);
        False = the node's answer is the draft's, recorded as such. No choice is made here: the guard is the plan's."""
        guard = node.guard
        ok, confidence = (draft is not None and draft.ok), (draft.confidence if draft is not None else None)
        res.confidence = confidence
        shown = "none reported" if confidence is None else f"{confidence:.3f}"
        if guard.escalates(ok, confidence):
            res.escalated = True
            res.note = (f"escalated: draft confidence {shown} < {guard.threshold:g}" if ok
                        else f"escalated: draft {draft.status if draft else 'missing'}")
            return True
        res.escalated, res.model = False, draft.model
        res.status, res.answer, res.end = "ok", draft.answer, res.start
        res.note = f"not escalated: draft confidence {shown} >= {guard.threshold:g}; the answer is {guard.source}'s"
        return False

    def now(self) -> float:
        return time.perf_counter() - self.t0
