"""The systems a benchmark compares, each a Hydra `system:` config. All answer the same query text on the same
loaded models; they differ only in how the query reaches a model:

- `Composed`: full compllm (decompose, route, compile, execute under `policy`, aggregate); with
  `drop_dependencies=true` it is the `no_deps` baseline (each sub-query answered on its own).
- `RouteOnly`: the whole query to the single most similar expert (composition of experts without decomposition).
- `Monolithic`: the whole query to one model with a plain assistant prompt, no experts; with `knowledge`, the
  passages retrieved for the whole query quoted before it (`monolithic_retrieval`, retrieval's fair control).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from compiler.build import node_id
from compllm.backends.base import GenerationRequest
from compllm.bench.compute import call
from compllm.frontend.decomposer import Decomposition
from compllm.frontend.parse import SubQuery
from compllm.knowledge.config import KnowledgeConfig
from compllm.pipeline import Pipeline
from compllm.runtime.prompts import passages_block


@dataclass
class SystemAnswer:
    """One query's outcome, in the shape the results file stores."""

    final_answer: str
    latency_s: float  # wall seconds from the chunk's start to this query's final answer, frontend included
    partial: bool = False
    error: str = ""
    subqueries: list[dict[str, Any]] = field(default_factory=list)  # text, depends_on, expert, answer, status
    decomposition: dict[str, Any] = field(default_factory=dict)  # fallback, format, reason
    model_calls: int = 0
    execute_latency_s: float | None = None  # the sub-query processing alone: plan execution start -> final answer
    # every model call made for it, as the engine counted it: {"model": alias, "prompt_tokens", "output_tokens"}
    # (the planner's included); read by compllm.bench.compute for parameter-compute
    calls: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Composed:
    def __init__(self, name: str, drop_dependencies: bool = False):
        self.name, self.drop_dependencies = name, drop_dependencies

    def run(self, pipeline: Pipeline, queries: Sequence[str]):
        return pipeline.run(queries, rewrite=drop_dependencies if self.drop_dependencies else None)

    def answer(self, pipeline: Pipeline, queries: Sequence[str]) -> tuple[list[SystemAnswer], dict | None]:
        """The chunk's answers, and its Chrome trace (the planner call, every plan step, per worker and query)."""
        result, graph = self.run(pipeline, queries)
        out = []
        for q in result.queries:
            nodes = {n.node_id: n for n in q.nodes}
            subs = []
            for sq in q.decomposition["subqueries"]:
                node = nodes.get(node_id(q.id, sq["index"]))
                subs.append({"text": sq["text"], "depends_on": list(sq["depends_on"]), "expert": sq["expert"],
                             "route_score": sq["route_score"], "answer": node.answer if node else "",
                             "status": node.status if node else "missing"})
            errors = [f"{n.node_id}: {n.error}" for n in q.nodes if n.status == "failed"]
            out.append(SystemAnswer(
                q.final_answer, q.latency, q.partial, "; ".join(errors), subs,
                {k: q.decomposition[k] for k in ("fallback", "format", "reason")},
                sum(n.attempts for n in q.nodes), q.execute_latency, model_calls_of(pipeline, q)))
        return out, result.trace


class RouteOnly(Composed):
    """Each query is one sub-query; the router alone picks who answers it."""

    def run(self, pipeline: Pipeline, queries: Sequence[str]):
        return pipeline.run(queries, decompositions=[Decomposition(q, (SubQuery(1, q, ()),), False,
                                                                   format="route_only") for q in queries])


class Monolithic:
    """`knowledge` (optional): the fair control for retrieval-grounded experts. The whole query is looked up in
    the same index (the same BM25, corpus, `k` and passage cap an expert reads) and the passages are quoted
    before it, as an expert's prompt quotes them."""

    depends_on = ("models", "system", "benchmark", "retry")  # no decomposer, router, experts or aggregator

    def __init__(self, name: str, system_prompt: str, max_new_tokens: int = 256, model: str = "default",
                 knowledge: KnowledgeConfig | None = None):
        self.name, self.system_prompt, self.max_new_tokens, self.model = name, system_prompt, max_new_tokens, model
        self.knowledge = KnowledgeConfig(**knowledge) if isinstance(knowledge, Mapping) else knowledge
        self._retriever = None

    def passages(self, pipeline: Pipeline, queries: Sequence[str]) -> list[list[dict]]:
        """Each query's top-k passages (empty lists without `knowledge`)."""
        if self.knowledge is None:
            return [[] for _ in queries]
        if self._retriever is None:
            from compllm.knowledge.retriever import Retrievers

            sources = Retrievers.for_experts({f"system.{self.name}": self.knowledge}, pipeline.cache_dir)
            self._retriever = sources[self.knowledge.source_key()]
        hits = self._retriever.search(list(queries), self.knowledge.k, self.knowledge.topics)
        return [[h.to_dict() for h in row] for row in hits]

    def request(self, query: str, passages: Sequence[Mapping[str, Any]]) -> GenerationRequest:
        user = query
        if self.knowledge is not None:
            user = passages_block(passages, self.knowledge.max_passage_chars) + "\n\nQuestion: " + query
        return GenerationRequest(({"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}),
                                 self.max_new_tokens)

    def answer(self, pipeline: Pipeline, queries: Sequence[str]) -> tuple[list[SystemAnswer], dict | None]:
        answers, _ = self.answer_reading(pipeline, queries)
        return answers, None  # one call: nothing to trace

    def answer_reading(self, pipeline: Pipeline,
                       queries: Sequence[str]) -> tuple[list[SystemAnswer], list[list[dict]]]:
        """The answers and the passages each query was given (one lookup, so a benchmark can score both)."""
        start = time.perf_counter()
        found = self.passages(pipeline, queries)
        generations = pipeline.pool.get(self.model).generate([self.request(q, p) for q, p in zip(queries, found)])
        wall = time.perf_counter() - start  # one batched call: every query's answer arrives at its end
        return [SystemAnswer(g.text, wall, model_calls=1, calls=[call(self.model, g.prompt_tokens, g.output_tokens)])
                for g in generations], found


def model_calls_of(pipeline: Pipeline, q) -> list[dict[str, Any]]:
    """A composed answer's model calls: the planner's (when a model wrote the split) and every node's."""
    planner = q.decomposition.get("planner_tokens")
    calls = [call(pipeline.decomposer.model, *planner)] if planner else []
    return calls + [call(n.model, n.prompt_tokens, n.output_tokens) for n in q.nodes
                    if n.model and (n.prompt_tokens or n.output_tokens)]


_REF = re.compile(r"#(\d+)\b")


def drop_dependencies(d: Decomposition) -> Decomposition:
    """The `no_deps` ablation: every sub-query runs on its own. A `#k` reference becomes the text of sub-query k
    (in brackets), so the question stays readable but gets no earlier answer."""
    texts = {sq.index: sq.text for sq in d.subqueries}

    def inline(sq: SubQuery) -> SubQuery:
        text = _REF.sub(lambda m: f"[{texts[int(m.group(1))]}]" if int(m.group(1)) in sq.depends_on else m.group(0),
                        sq.text)
        return SubQuery(sq.index, text, (), sq.answer_type)

    return replace(d, subqueries=tuple(inline(sq) for sq in d.subqueries))
