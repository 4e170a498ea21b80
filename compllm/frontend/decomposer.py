"""Split a compound query into sub-queries with explicit dependencies, using an LLM and a tolerant parser."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from compllm.backends.base import Generation, GenerationRequest
from compllm.frontend.parse import DecompositionParseError, SubQuery, parse_decomposition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decomposition:
    query: str
    subqueries: tuple[SubQuery, ...]
    fallback: bool  # True when the model output was unusable and the query became its own single sub-query
    reason: str = ""  # why the fallback was taken
    warnings: tuple[str, ...] = ()
    raw_output: str = ""
    format: str = ""
    generation: Generation | None = field(default=None, compare=False)


class Decomposer:
    """Prompts `model` with a few worked examples; any unusable output falls back to the whole query."""

    def __init__(self, model: str, system_prompt: str, examples: Sequence[Mapping[str, Any]] = (),
                 max_subqueries: int = 8, max_chars: int = 1000, max_new_tokens: int = 256,
                 max_query_chars: int = 4000):
        self.model = model
        self.system_prompt = system_prompt
        self.examples = [(ex["query"], _as_json(ex["subqueries"])) for ex in examples]
        self.max_subqueries = max_subqueries
        self.max_chars = max_chars
        self.max_new_tokens = max_new_tokens
        self.max_query_chars = max_query_chars

    def request(self, query: str) -> GenerationRequest:
        messages = [{"role": "system", "content": self.system_prompt}]
        for ex_query, ex_answer in self.examples:
            messages += [{"role": "user", "content": ex_query}, {"role": "assistant", "content": ex_answer}]
        messages.append({"role": "user", "content": query[: self.max_query_chars]})
        return GenerationRequest(tuple(messages), self.max_new_tokens)

    def decompose(self, backend, queries: Sequence[str]) -> list[Decomposition]:
        """One batched call for all queries, then parse each output (or fall back)."""
        generations = backend.generate([self.request(q) for q in queries])
        return [self.parse(q, g.text, g) for q, g in zip(queries, generations)]

    def parse(self, query: str, raw: str, generation: Generation | None = None) -> Decomposition:
        try:
            parsed = parse_decomposition(raw, max_subqueries=self.max_subqueries, max_chars=self.max_chars)
        except DecompositionParseError as exc:
            log.warning("decomposer output unusable (%s); answering the query as a single sub-query", exc)
            return self.single(query, reason=str(exc), raw=raw, generation=generation)
        return Decomposition(query, parsed.subqueries, False, "", parsed.warnings, raw, parsed.format, generation)

    def single(self, query: str, reason: str, raw: str = "", generation: Generation | None = None) -> Decomposition:
        """The documented fallback: the original query, unsplit, as sub-query #1."""
        text = query[: self.max_chars]
        return Decomposition(query, (SubQuery(1, text, ()),), True, reason, (), raw, "fallback", generation)


def _as_json(subqueries: Sequence[Mapping[str, Any]]) -> str:
    items = [
        {"id": i, "question": sq["question"], "depends_on": list(sq.get("depends_on", []))}
        for i, sq in enumerate(subqueries, start=1)
    ]
    return json.dumps(items, ensure_ascii=False)
