"""Split a compound query into sub-queries with explicit dependencies, using an LLM and a tolerant parser.

With `constrained`, the planner decodes under `plan_schema` (dependencies can only name earlier parts), so what an
engine that enforces the schema returns is a DAG by construction; the tolerant parser still reads every output
(an enforced one cut at `max_new_tokens`, or one from a backend that cannot enforce a schema), and
`Decomposition.decoding` records which path was taken."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from compiler.choices import option_letters
from compllm.backends.base import Generation, GenerationRequest
from compllm.backends.sanitize import neutralise
from compllm.frontend.answer_format import with_closed_form
from compllm.frontend.enumerated import numbered_references, split_enumerated
from compllm.frontend.parse import DecompositionParseError, SubQuery, parse_decomposition
from compllm.frontend.plan_schema import plan_schema_text, schema_violation
from compllm.runtime.faults import CallOutcome

log = logging.getLogger(__name__)

#: How the decomposer reaches its model: the runtime's retry/timeout path, one outcome per request, never raising.
PlannerCall = Callable[[list[GenerationRequest]], list[CallOutcome]]


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
    omitted: str = ""  # parts of the query that will not be answered (over a cap), said in the final answer
    # How the planner's output was decoded and read: `free` (no schema asked), `constrained` (the backend enforced
    # the schema and the output conforms), `constrained-repaired` (enforced, but the output did not conform, e.g.
    # cut at max_new_tokens: the tolerant parser read it), `unenforced` (schema asked, the backend cannot enforce
    # it: the tolerant parser read free text); "" when no model wrote it (numbered questions, a failed call).
    decoding: str = ""
    # the query's closed-form instruction ("Answer yes or no.") when a last part was added to ask the query in that
    # form (`answer_format`); "" otherwise
    closed_form: str = ""


class Decomposer:
    """Prompts `model` with a few worked examples; any unusable output falls back to the whole query.

    Caps bound everything that enters: a query longer than `max_query_chars` is cut (with a warning) before it
    is prompted, compiled or aggregated; at most `max_subqueries` sub-queries of at most `max_chars` each.
    """

    def __init__(self, model: str, system_prompt: str, examples: Sequence[Mapping[str, Any]] = (),
                 max_subqueries: int = 8, max_chars: int = 1000, max_new_tokens: int = 256,
                 max_query_chars: int = 4000, split_enumerated: bool = True, detect_choices: bool = True,
                 stream: bool = True, constrained: bool = False, max_question_chars: int = 160,
                 fanoutqa_exemplars: Sequence[str] = ()):
        self.model = model
        self.stream = stream  # read while it writes: parts join the running plan as soon as they are complete
        self.split_enumerated = split_enumerated
        self.detect_choices = detect_choices
        self.system_prompt = system_prompt
        self.examples = [(ex["query"], _as_json(ex["subqueries"])) for ex in examples]
        self.fanoutqa_exemplars = tuple(str(i) for i in fanoutqa_exemplars)  # evaluations must leave these out
        if self.fanoutqa_exemplars:
            from compllm.data.fanoutqa import exemplars

            self.examples += [(ex["query"], _as_json(ex["subqueries"])) for ex in exemplars(self.fanoutqa_exemplars)]
        self.constrained = constrained
        self.max_question_chars = max_question_chars
        self.max_subqueries = max_subqueries
        self.max_chars = max_chars
        self.max_new_tokens = max_new_tokens
        self.max_query_chars = max_query_chars
        for name in ("max_subqueries", "max_chars", "max_new_tokens", "max_query_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"decomposer.{name}={getattr(self, name)!r} must be at least 1")
        # the schema's text, built (and checked: at most 9 parts) once; "" when unconstrained
        self.json_schema = (plan_schema_text(self.max_subqueries, min(max_question_chars, max_chars))
                            if constrained else "")

    def cap(self, query: str) -> tuple[str, tuple[str, ...]]:
        """The query as the rest of the pipe sees it: at most max_query_chars, plus a warning when cut."""
        if len(query) <= self.max_query_chars:
            return query, ()
        return query[: self.max_query_chars], (
            f"query is {len(query)} chars; only the first {self.max_query_chars} are answered (decomposer.max_query_chars)",)

    def request(self, query: str) -> GenerationRequest:
        messages = [{"role": "system", "content": self.system_prompt}]
        for ex_query, ex_answer in self.examples:
            messages += [{"role": "user", "content": ex_query}, {"role": "assistant", "content": ex_answer}]
        messages.append({"role": "user", "content": neutralise(query[: self.max_query_chars])})
        return GenerationRequest(tuple(messages), self.max_new_tokens, json_schema=self.json_schema)

    def answer_type(self, text: str) -> str:
        """`choice` for a question that lists lettered options (when detect_choices), else `text`."""
        return "choice" if self.detect_choices and option_letters(text) else "text"

    def enumerated(self, query: str) -> Decomposition | None:
        """The query's own numbered questions as independent sub-queries, or None for a free-form query."""
        if not self.split_enumerated:
            return None
        capped, warnings = self.cap(query)
        parts = split_enumerated(capped)
        if parts is None:
            return None
        omitted = ""
        if len(parts) > self.max_subqueries:
            first, last = self.max_subqueries + 1, len(parts)
            which = f"question {first} of {last} was" if first == last else f"questions {first}-{last} of {last} were"
            omitted = f"{which} not answered: at most {self.max_subqueries} are (decomposer.max_subqueries)"
            warnings += (omitted,)
        kept = parts[: self.max_subqueries]
        deps, notes = numbered_references(kept)
        for note in notes:
            log.warning("numbered questions: %s", note)
        subqueries = tuple(SubQuery(i, text[: self.max_chars], deps[i - 1], self.answer_type(text)) for i, text in
                           enumerate(kept, 1))
        return Decomposition(capped, subqueries, False, "", warnings + tuple(notes), "", "enumerated", omitted=omitted)

    def needs_model(self, queries: Sequence[str]) -> list[str]:
        """The queries a model must split (the others number their own questions)."""
        return [q for q in queries if self.enumerated(q) is None]

    def decompose(self, call: PlannerCall, queries: Sequence[str]) -> list[Decomposition]:
        """Numbered queries split at their numbers; one batched model call for the rest (through `call`, the
        runtime's retry/timeout path), each output parsed, or the query falls back to itself."""
        done = {i: d for i, q in enumerate(queries) if (d := self.enumerated(q)) is not None}
        rest = [q for i, q in enumerate(queries) if i not in done]
        parsed = iter(self._decompose_with_model(call, rest) if rest else ())
        return [done[i] if i in done else next(parsed) for i in range(len(queries))]

    def _decompose_with_model(self, call: PlannerCall, queries: Sequence[str]) -> list[Decomposition]:
        out = []
        for query, outcome in zip(queries, call([self.request(q) for q in queries])):
            if outcome.generation is None:
                log.warning("decomposer call failed (%s); answering the query unsplit", outcome.error)
                out.append(self.single(query, reason=f"decomposer call failed: {outcome.error}"))
            else:
                out.append(self.keep_closed_form(self.parse(query, outcome.generation.text, outcome.generation)))
        return out

    def keep_closed_form(self, d: Decomposition) -> Decomposition:
        """`d` with a last part asking the query itself when it ends in a closed-form instruction the parts dropped
        (`compllm.frontend.answer_format`); applied to every model-written split, streamed or not."""
        return with_closed_form(d, self.max_subqueries, self.max_chars)

    def decoding(self, raw: str, generation: Generation | None) -> tuple[str, tuple[str, ...]]:
        """How this output was decoded (see `Decomposition.decoding`), and a warning when the schema was not kept."""
        if not self.constrained:
            return "free", ()
        if generation is not None and not generation.constrained:
            return "unenforced", ("the planner's backend cannot enforce the plan schema (decomposer.constrained); "
                                  "its free-text output was read by the tolerant parser",)
        try:
            problem = schema_violation(json.loads(raw), self.max_subqueries)
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        if not problem:
            return "constrained", ()
        cut = " (cut at decomposer.max_new_tokens)" if generation is not None and generation.finish_reason == "length" else ""
        return "constrained-repaired", (f"the constrained planner output does not conform to the plan schema{cut}: "
                                        f"{problem}; read by the tolerant parser",)

    def parse(self, query: str, raw: str, generation: Generation | None = None) -> Decomposition:
        capped, warnings = self.cap(query)
        decoding, notes = self.decoding(raw, generation)
        try:
            parsed = parse_decomposition(raw, max_subqueries=self.max_subqueries, max_chars=self.max_chars)
        except DecompositionParseError as exc:
            log.warning("decomposer output unusable (%s); answering the query as a single sub-query", exc)
            return replace(self.single(query, reason=str(exc), raw=raw, generation=generation), decoding=decoding,
                           warnings=warnings + notes)
        omitted = next((w for w in parsed.warnings if "exceed the cap" in w), "")
        return Decomposition(capped, parsed.subqueries, False, "", warnings + notes + parsed.warnings, raw,
                             parsed.format, generation, omitted, decoding)

    def single(self, query: str, reason: str, raw: str = "", generation: Generation | None = None) -> Decomposition:
        """The documented fallback: the original query, unsplit, as sub-query #1."""
        capped, warnings = self.cap(query)
        text = capped[: self.max_chars]
        return Decomposition(capped, (SubQuery(1, text, ()),), True, reason, warnings, raw, "fallback", generation)


def _as_json(subqueries: Sequence[Mapping[str, Any]]) -> str:
    items = [
        {"id": i, "question": sq["question"], "depends_on": list(sq.get("depends_on", []))}
        for i, sq in enumerate(subqueries, start=1)
    ]
    return json.dumps(items, ensure_ascii=False)
