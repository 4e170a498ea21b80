"""A query that asks for its answer in a closed form ("Answer yes or no.") keeps that form through the split.

Why: the planner rewrites the question into parts and drops the instruction, so every part is answered in free
text and the joined final answer holds no yes/no (StrategyQA, bench_retrieval: 25 of 50 compiled answers had
none; the monolithic model, given the instruction, 0 of 50). The fix is structural, not a prompt plea: the
decomposition gets one last part that asks the query itself, instruction included, reading the parts nothing
else reads, so the final answer is that part's answer in the asked form.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace

from compllm.frontend.parse import SubQuery

log = logging.getLogger(__name__)

# The query's closing sentence asking for a closed answer: yes/no or true/false (optionally "only", "with",
# "just", quoted words). Open formats ("answer briefly") are not closed forms: the parts' own answers serve.
_CLOSED_FORM = re.compile(
    r"(?:^|(?<=[.?!:])\s+)((?:please\s+)?(?:answer|reply|respond)(?:\s+(?:only|just|with|in|using))*\s+"
    r"(?:(?:a|one)\s+(?:word|single word)\s*[:,]?\s*)?"
    r"[\"'“]?(?:yes|true)[\"'”]?\s*(?:or|/)\s*[\"'“]?(?:no|false)[\"'”]?(?:\s+only)?\s*[.!]?)\s*$",
    re.IGNORECASE,
)


def closed_form_instruction(query: str) -> str:
    """The query's closing yes/no (true/false) instruction, or "" when it asks for no closed form."""
    m = _CLOSED_FORM.search(query.strip())
    return m.group(1).strip() if m else ""


def sinks(parts: tuple[SubQuery, ...]) -> tuple[int, ...]:
    """The parts no other part reads: what a joined final answer is made of."""
    read = {d for sq in parts for d in sq.depends_on}
    return tuple(sq.index for sq in parts if sq.index not in read)


def ask_in_closed_form(query: str, parts: tuple[SubQuery, ...], max_parts: int,
                       max_chars: int) -> tuple[tuple[SubQuery, ...], str]:
    """`parts` plus a last part asking `query` itself after the current sinks, when `query` ends in a closed-form
    instruction that no sink kept; with a note saying what was done (or why not: at `max_parts`)."""
    instruction = closed_form_instruction(query)
    if not instruction or not parts:
        return parts, ""
    ends = sinks(parts)
    if any(instruction.lower() in parts[i - 1].text.lower() for i in ends):
        return parts, ""
    if len(parts) >= max_parts:
        return parts, (f"the query asks {instruction!r} but its {len(parts)} parts are at decomposer.max_subqueries; "
                       "the final answer may not be in that form")
    last = SubQuery(len(parts) + 1, query.strip()[:max_chars], ends)
    return parts + (last,), f"part {last.index} asks the query itself so the answer keeps its form ({instruction!r})"


def with_closed_form(d, max_parts: int, max_chars: int):
    """`Decomposition` d with the closed-form part added (model-written splits only: a fallback is the query
    itself, and numbered questions keep their own per-question answers)."""
    if d.fallback or d.format in ("enumerated", "fallback"):
        return d
    parts, note = ask_in_closed_form(d.query, d.subqueries, max_parts, max_chars)
    if parts is d.subqueries:
        return replace(d, warnings=d.warnings + (note,)) if note else d
    log.debug("%s", note)
    return replace(d, subqueries=parts, closed_form=closed_form_instruction(d.query))
