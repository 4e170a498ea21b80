"""The JSON Schema a constrained planner decodes under: every output it admits is a DAG by construction.

Shape: a JSON list of 1..`max_subqueries` objects `{"id": i, "question": "...", "depends_on": [...]}` where item i
has `id` exactly i and `depends_on` can only name 1..i-1, so an edge can never point forward, at itself, or at a
missing part, and no cycle can be written. The question text may hold `#k` (the answer of part k) only for k < i
and only as a whole reference (`#1` but not `#12`, `#1#2` or a bare `#`), so a reference in the text can never
add a forward edge either (the parser turns `#k` into an edge). Each length is a separate `anyOf` alternative
(a fixed `prefixItems` tuple): engines' schema-to-grammar converters (llama.cpp's among them) read `prefixItems`
as the whole tuple, so "items 1..k, for some k" has to be spelt out.

Pure data: no engine is imported; backends turn it into their own grammar.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

#: The most sub-queries a schema can admit: ids stay one digit, so `#k` in the text cannot run into `#kk`.
MAX_SCHEMA_SUBQUERIES = 9
_PLAIN = r'[^"\\#\x00-\x1f]'  # one JSON string character needing no escape, other than '#'
_AFTER_REF = r'[^"\\#0-9\x00-\x1f]'  # what may follow a `#k`: no digit, so `#1` cannot grow into `#12`


def _question(index: int, max_chars: int) -> dict[str, Any]:
    if index == 1:
        pattern = rf"^{_PLAIN}{{1,{max_chars}}}$"
    else:
        ref = f"#[1-{index - 1}]"
        # plain groups only: llama.cpp's converter has no (?:...)
        pattern = rf"^({_PLAIN}|{ref}{_AFTER_REF}){{1,{max_chars}}}({ref})?$"
    return {"type": "string", "pattern": pattern}


def _item(index: int, max_chars: int) -> dict[str, Any]:
    depends = ({"type": "array", "items": {"enum": list(range(1, index))}, "maxItems": index - 1}
               if index > 1 else {"enum": [[]]})
    return {"type": "object",
            "properties": {"id": {"const": index}, "question": _question(index, max_chars), "depends_on": depends},
            "required": ["id", "question", "depends_on"], "additionalProperties": False}


def plan_schema(max_subqueries: int, max_question_chars: int) -> dict[str, Any]:
    """The schema of a plan of at most `max_subqueries` parts of at most `max_question_chars` characters each."""
    if not 1 <= max_subqueries <= MAX_SCHEMA_SUBQUERIES:
        raise ValueError(f"a constrained plan has 1..{MAX_SCHEMA_SUBQUERIES} sub-queries "
                         f"(decomposer.max_subqueries={max_subqueries})")
    if max_question_chars < 8:
        raise ValueError(f"decomposer.max_question_chars={max_question_chars} must be at least 8")
    items = [_item(i, max_question_chars) for i in range(1, max_subqueries + 1)]
    return {"anyOf": [{"type": "array", "prefixItems": items[:k], "minItems": k, "maxItems": k}
                      for k in range(1, max_subqueries + 1)]}


@lru_cache(maxsize=16)
def plan_schema_text(max_subqueries: int, max_question_chars: int) -> str:
    """`plan_schema` as the JSON text a `GenerationRequest.json_schema` carries."""
    return json.dumps(plan_schema(max_subqueries, max_question_chars), separators=(",", ":"))


_TEXT_REF = re.compile(r"#+(\d+)")


def schema_violation(value: Any, max_subqueries: int) -> str:
    """Why `value` (decoded JSON) is not a plan `plan_schema` admits, or "" when it is one.

    The same rules as the schema (ids 1..k in order, `depends_on` and `#k` only naming earlier parts), checked in
    Python so the decomposer can tell an enforced output from one the tolerant parser had to repair, with no JSON
    Schema validator at run time."""
    if not isinstance(value, list) or not 1 <= len(value) <= max_subqueries:
        return f"not a list of 1..{max_subqueries} sub-queries"
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict) or set(item) != {"id", "question", "depends_on"}:
            return f"item {i} is not an object of exactly id, question, depends_on"
        if item["id"] != i or isinstance(item["id"], bool):
            return f"item {i} has id {item['id']!r}"
        if not isinstance(item["question"], str) or not item["question"].strip():
            return f"item {i} has no question text"
        deps = item["depends_on"]
        if not isinstance(deps, list) or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < i
                                             for d in deps):
            return f"item {i} depends on {deps!r}, not only on earlier items"
        if any(not 1 <= int(k) < i for k in _TEXT_REF.findall(item["question"])):
            return f"item {i}'s question refers to a part that is not earlier"
    return ""
