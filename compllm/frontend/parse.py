"""Tolerant parser for decomposer output.

The decomposer is a small LLM (0.1B-0.5B parameters); it is asked for a JSON array of sub-queries but
often wraps it in prose or code fences, truncates it at the token limit, numbers ids oddly, or answers
with a numbered list instead. This module recovers whatever is usable, normalises it into a clean DAG
(1..n, topologically ordered, `#k` references rewritten to the new numbers) and records every repair
as a warning. Anything it cannot make sense of raises `DecompositionParseError`, and nothing else, so
the caller can fall back to answering the original query unsplit.

Model output is data: it is only ever read with `json` and regular expressions, never evaluated.
"""
from __future__ import annotations

import heapq
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable

from compiler.ir import AnswerType

SCAN_LIMIT = 50_000  # only this much raw output is looked at, so huge outputs cost bounded time/memory
_MAX_JSON_STARTS = 64  # '[' / '{' positions tried as the start of the JSON payload
_EXCERPT_CHARS = 80

FORMATS = ("json", "json-partial", "numbered", "lines")
ANSWER_TYPES = tuple(t.value for t in AnswerType)  # the IR's answer types, the one home of the names
_ANSWER_ALIASES = {
    "string": "text", "str": "text", "free_text": "text", "freetext": "text",
    "numeric": "number", "int": "number", "integer": "number", "float": "number", "quantity": "number",
    "multiple_choice": "choice", "multiplechoice": "choice", "option": "choice",
    "yes/no": "yesno", "yes_no": "yesno", "yes-no": "yesno", "bool": "yesno", "boolean": "yesno",
    "name": "entity", "named_entity": "entity", "array": "list",
}

# Keys are matched case-insensitively; the first key present wins.
_ID_KEYS = ("id", "index", "step", "idx", "number", "num", "n")
_TEXT_KEYS = ("question", "query", "subquery", "sub_query", "sub-query", "subquestion", "sub_question",
              "text", "q", "content", "prompt")
_DEPS_KEYS = ("depends_on", "deps", "dependencies", "depends", "dependson", "depends on", "dependency",
              "requires", "parents")
_TYPE_KEYS = ("answer_type", "type", "answertype", "answer type")
_LIST_KEYS = ("subqueries", "sub_queries", "sub-queries", "subquestions", "sub_questions", "questions",
              "queries", "steps", "decomposition", "items", "plan")

# `#3` (or `##3`) refers to the answer of sub-query 3. `\d` is Unicode-aware; digits are normalised below.
_REF = re.compile(r"#+(\d+)")
_ID_STRING = re.compile(r"^\s*(?:#|q|step|sub[-_ ]?(?:query|question)|question|query)?\s*#?\s*(\d+)\s*$", re.I)
_NUMBERED_KEYWORD = re.compile(
    r"^\s*(?:[-*\u2022>]\s*)?(?:\*\*|__)?\s*(?:sub[-_ ]?(?:query|question)|question|query|step|q)\s*#?\s*(\d+)"
    r"\s*(?:\*\*|__)?\s*[:.)\-\u2013](?:\*\*|__)?\s*(.*)$", re.I)
_NUMBERED_PLAIN = re.compile(r"^\s*(?:[-*\u2022>]\s*)?(?:\*\*|__)?\s*\(?(\d+)(?:[.)]|:)(?:\*\*|__)?(?=\s|$)\s*(.*)$")
_DEPENDS_SUFFIX = re.compile(
    r"[(\[]\s*(?:depends\s+on|deps?|dependencies|uses|needs)\s*:?\s*((?:#?\d+\s*(?:,|and|&)?\s*)+)[)\]]\s*$", re.I)
_BULLET = re.compile(r"^\s*(?:[-*\u2022>]+|\d+[.)])\s*")
_FENCE_LINE = re.compile(r"^\s*```")


@dataclass(frozen=True)
class SubQuery:
    """One step of a decomposition; `#k` in `text` stands for the answer of sub-query k."""

    index: int  # 1-based, contiguous, topologically ordered: every dependency has a smaller index
    text: str  # `#k` references use the final (renumbered) indices
    depends_on: tuple[int, ...]  # sorted, unique, each < index
    answer_type: str = "text"  # one of ANSWER_TYPES


@dataclass(frozen=True)
class ParseResult:
    """The cleaned decomposition plus an audit trail of every repair, for logs and reports."""

    subqueries: tuple[SubQuery, ...]
    warnings: tuple[str, ...]
    format: str  # one of FORMATS: which reading of the raw output succeeded


class DecompositionParseError(ValueError):
    """The decomposer output held no usable decomposition; the caller answers the query unsplit."""


@dataclass
class _Item:
    """A sub-query as read from the output, before validation: ids and dependencies are raw keys."""

    key: str | None
    text: str
    deps: list[str]
    answer_type: str = "text"


def parse_decomposition(raw: str, *, max_subqueries: int = 8, max_chars: int = 1000) -> ParseResult:
    """Read decomposer output in the first format that yields sub-queries: JSON, numbered list, '?' lines.

    Raises DecompositionParseError (only) when nothing usable is found or the dependencies form a cycle.
    """
    if not isinstance(raw, str):
        raise DecompositionParseError(f"decomposer output is {type(raw).__name__}, not text")
    try:
        return _parse(raw, max(1, int(max_subqueries)), max(1, int(max_chars)))
    except DecompositionParseError:
        raise
    except Exception as exc:  # safety net: a parser bug must not take the pipeline down, only cause the fallback
        raise DecompositionParseError(
            f"internal parser error ({type(exc).__name__}: {exc}) on output {_excerpt(raw)}") from exc


def _parse(raw: str, max_subqueries: int, max_chars: int) -> ParseResult:
    warnings: list[str] = []
    text = raw
    if len(text) > SCAN_LIMIT:
        text = text[:SCAN_LIMIT]
        warnings.append(f"output is {len(raw)} chars; only the first {SCAN_LIMIT} were scanned")
    if not text.strip():
        raise DecompositionParseError("decomposer output is empty")

    found = _from_json(text, warnings)
    if found is None:
        found = _from_numbered(text)
    if found is None:
        found = _from_question_lines(text)
    if found is None:
        raise DecompositionParseError(
            "no JSON array of sub-queries, numbered list or question lines found in output " + _excerpt(raw))
    items, fmt = found
    subqueries = _build(items, warnings, max_subqueries, max_chars, raw)
    return ParseResult(subqueries, tuple(warnings), fmt)


# --------------------------------------------------------------------------- reading JSON


def _from_json(text: str, warnings: list[str]) -> tuple[list[_Item], str] | None:
    """Find the first '['/'{' from which a list of sub-query items decodes (strictly, repaired, or element-wise)."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:_MAX_JSON_STARTS]
    for start in starts:
        for candidate, repaired in _variants(text[start:]):
            try:
                value, _ = decoder.raw_decode(candidate)
            except (ValueError, RecursionError):
                continue
            elements = _find_item_list(value)
            if elements is not None:
                if repaired:
                    warnings.append("repaired JSON (single quotes / trailing commas)")
                return _json_items(elements, warnings), "json"
        if text[start] == "[":
            for candidate, repaired in _variants(text[start:]):
                elements, complete = _decode_elements(decoder, candidate)
                if _looks_like_items(elements):
                    if repaired:
                        warnings.append("repaired JSON (single quotes / trailing commas)")
                    if not complete:
                        warnings.append(f"JSON array is truncated; recovered {len(elements)} complete element(s)")
                    return _json_items(elements, warnings), "json" if complete else "json-partial"
    return None


def _variants(segment: str) -> Iterable[tuple[str, bool]]:
    """The segment as is, then with cheap repairs: single -> double quotes (if no double quotes), trailing commas."""
    yield segment, False
    repaired = segment if '"' in segment else segment.replace("'", '"')
    repaired = re.sub(r",(\s*[\]}])", r"\1", repaired)
    if repaired != segment:
        yield repaired, True


def _decode_elements(decoder: json.JSONDecoder, segment: str) -> tuple[list[Any], bool]:
    """Decode array elements one by one so a truncated array still yields its complete elements."""
    elements: list[Any] = []
    pos, end = 1, len(segment)
    while pos < end:
        ch = segment[pos]
        if ch.isspace() or ch == ",":
            pos += 1
        elif ch == "]":
            return elements, True
        else:
            try:
                value, pos = decoder.raw_decode(segment, pos)
            except (ValueError, RecursionError):
                break
            elements.append(value)
    return elements, False


def _find_item_list(value: Any) -> list[Any] | None:
    """The list of sub-query items: `value` itself, a list under a key of a wrapper object, or one lone item."""
    if isinstance(value, list):
        return value if _looks_like_items(value) else None
    if isinstance(value, dict):
        lowered = {str(k).strip().lower(): v for k, v in value.items()}
        candidates = [lowered[k] for k in _LIST_KEYS if k in lowered] + list(value.values())
        for candidate in candidates:
            if isinstance(candidate, list) and _looks_like_items(candidate):
                return candidate
        if isinstance(_get(value, _TEXT_KEYS), str):
            return [value]
    return None


def _looks_like_items(elements: list[Any]) -> bool:
    """Objects with a question text, or plain question strings (not e.g. a list of dependency ids)."""
    if not elements or not all(isinstance(e, (dict, str)) for e in elements):
        return False
    return any(
        (isinstance(e, dict) and isinstance(_get(e, _TEXT_KEYS), str))
        or (isinstance(e, str) and any(c.isalpha() for c in e))
        for e in elements
    )


def _json_items(elements: list[Any], warnings: list[str]) -> list[_Item]:
    items: list[_Item] = []
    for position, element in enumerate(elements, start=1):
        if isinstance(element, str):
            items.append(_Item(None, element, []))
            continue
        if not isinstance(element, dict):
            warnings.append(f"ignored element {position}: not an object")
            continue
        text = _get(element, _TEXT_KEYS)
        if not isinstance(text, str):
            text = ""
        deps = _dep_keys(_get(element, _DEPS_KEYS), warnings, position)
        items.append(_Item(_id_key(_get(element, _ID_KEYS)), text, deps, _answer_type(_get(element, _TYPE_KEYS))))
    return items


def _get(obj: dict, keys: tuple[str, ...]) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


# --------------------------------------------------------------------------- reading text formats


def _from_numbered(text: str) -> tuple[list[_Item], str] | None:
    """'1. ...', '1) ...', 'Q1: ...', 'Step 1: ...', 'Sub-query 1: ...'; dependencies come from `#N` in the text."""
    items = []
    for line in text.splitlines():
        match = _NUMBERED_KEYWORD.match(line) or _NUMBERED_PLAIN.match(line)
        if not match:
            continue
        body, deps = match.group(2), []
        suffix = _DEPENDS_SUFFIX.search(body)
        if suffix:
            deps = [_norm_digits(d) for d in re.findall(r"\d+", suffix.group(1))]
            body = body[: suffix.start()]
        items.append(_Item(_norm_digits(match.group(1)), _clean_line(body), deps))
    return (items, "numbered") if items else None


def _from_question_lines(text: str) -> tuple[list[_Item], str] | None:
    """Last resort: every non-empty line ending with '?' is a sub-query, numbered by position."""
    items = []
    for line in text.splitlines():
        if _FENCE_LINE.match(line):
            continue
        line = _clean_line(_BULLET.sub("", line, count=1))
        if line.endswith("?"):
            items.append(_Item(None, line, []))
    return (items, "lines") if items else None


def _clean_line(text: str) -> str:
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


# --------------------------------------------------------------------------- normalising values


def _norm_digits(digits: str) -> str:
    """Canonical key for a run of (possibly non-ASCII) decimal digits: ASCII, no leading zeros."""
    return "".join(str(unicodedata.decimal(c)) for c in digits).lstrip("0") or "0"


def _id_key(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return _norm_digits(str(value)) if value >= 0 else str(value)
    if isinstance(value, float):
        return _id_key(int(value)) if value.is_integer() else None
    if isinstance(value, str):
        match = _ID_STRING.match(value)
        if match:
            return _norm_digits(match.group(1))
        name = value.strip().lower()
        return name or None
    return None


def _dep_keys(value: Any, warnings: list[str], position: int) -> list[str]:
    """depends_on as ints, "1", "#1", "Q1", "1, 2", or a list of those."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    keys: list[str] = []
    for v in values:
        if isinstance(v, str):
            if _ID_STRING.match(v):
                keys.append(_norm_digits(_ID_STRING.match(v).group(1)))
            elif re.search(r"\d", v):
                keys += [_norm_digits(n) for n in re.findall(r"\d+", v)]  # "1, 2" or "#1 and #2"
            elif v.strip():
                keys.append(v.strip().lower())  # a named id such as "a"
        elif _id_key(v) is not None:
            keys.append(_id_key(v))
        else:
            warnings.append(f"element {position}: ignored unreadable dependency {str(v)[:20]!r}")
    return keys


def _answer_type(value: Any) -> str:
    if not isinstance(value, str):
        return "text"
    name = value.strip().lower().replace(" ", "_")
    name = _ANSWER_ALIASES.get(name, name)
    return name if name in ANSWER_TYPES else "text"


# --------------------------------------------------------------------------- building the DAG


def _build(items: list[_Item], warnings: list[str], max_subqueries: int, max_chars: int, raw: str
           ) -> tuple[SubQuery, ...]:
    """Validate ids and dependencies, merge duplicates, sort topologically, renumber, cap and truncate."""
    keys = [item.key for item in items]
    if None in keys or len(set(keys)) != len(keys):
        if any(k is not None for k in keys):
            warnings.append("sub-query ids missing or duplicated; numbered them by position")
        for position, item in enumerate(items, start=1):
            item.key = str(position)

    kept = []
    for item in items:
        item.text = item.text.strip()
        if item.text:
            kept.append(item)
        else:
            warnings.append(f"dropped sub-query {item.key}: empty text")
    if not kept:
        raise DecompositionParseError(f"all {len(items)} sub-queries have empty text in output " + _excerpt(raw))
    by_key = {item.key: item for item in kept}

    deps: dict[str, list[str]] = {}
    previous = {item.key: before.key for before, item in zip(kept, kept[1:])}
    for item in kept:
        wanted = list(dict.fromkeys(item.deps + [_norm_digits(m.group(1)) for m in _REF.finditer(item.text)]))
        valid = []
        for dep in wanted:
            if dep == item.key and item.key in previous:
                # small planners count from 0 ("depends on 2" written on step 2 means the step before it)
                warnings.append(f"sub-query {item.key}: read its reference to itself as the previous part, "
                                f"{previous[item.key]}")
                valid.append(previous[item.key])
                item.text = re.sub(rf"#+{re.escape(item.key)}\b", f"#{previous[item.key]}", item.text)
            elif dep == item.key:
                warnings.append(f"sub-query {item.key}: dropped reference to itself")
            elif dep not in by_key:
                warnings.append(f"sub-query {item.key}: dropped reference to missing sub-query {dep}")
            else:
                valid.append(dep)
        deps[item.key] = valid

    # Merge exact duplicates that depend on nothing; references to a dropped copy go to the kept one.
    alias: dict[str, str] = {}
    first_with_text: dict[str, str] = {}
    for item in kept:
        if deps[item.key]:
            continue
        norm = " ".join(item.text.split())
        if norm in first_with_text:
            alias[item.key] = first_with_text[norm]
            warnings.append(f"merged duplicate sub-query {item.key} into {first_with_text[norm]}")
        else:
            first_with_text[norm] = item.key
    kept = [item for item in kept if item.key not in alias]
    deps = {item.key: sorted({alias.get(d, d) for d in deps[item.key]}) for item in kept}

    order = _topological_order([item.key for item in kept], deps, raw)
    if len(order) > max_subqueries:
        warnings.append(f"{len(order)} sub-queries exceed the cap of {max_subqueries}; kept the first "
                        f"{max_subqueries} in dependency order (their dependencies are all kept)")
        order = order[:max_subqueries]
    new_index = {key: i for i, key in enumerate(order, start=1)}

    result = []
    for key in order:
        item, own = by_key[key], set(deps[key])
        text = _truncate(_rewrite_references(item.text, own, alias, new_index), max_chars, warnings, new_index[key])
        result.append(SubQuery(new_index[key], text, tuple(sorted(new_index[d] for d in own)), item.answer_type))
    return tuple(result)


def _rewrite_references(text: str, own: set[str], alias: dict[str, str], new_index: dict[str, int]) -> str:
    """`#old` -> `#new` for real dependencies; any other `#N` loses its '#' so no stray reference survives."""

    def rewrite(m: re.Match) -> str:
        target = alias.get(_norm_digits(m.group(1)), _norm_digits(m.group(1)))
        if target in own:
            return f"#{new_index[target]}"
        # Spaced when a digit precedes, so "#5#9" cannot fuse into the reference "#59".
        return (" " if m.start() and text[m.start() - 1].isdecimal() else "") + m.group(1)

    return _REF.sub(rewrite, text)


def _topological_order(keys: list[str], deps: dict[str, list[str]], raw: str) -> list[str]:
    """Kahn's algorithm, stable: among ready sub-queries the one that came first in the output goes first."""
    position = {key: i for i, key in enumerate(keys)}
    waiting = {key: len(deps[key]) for key in keys}
    children: dict[str, list[str]] = {key: [] for key in keys}
    for key in keys:
        for dep in deps[key]:
            children[dep].append(key)
    ready = [position[key] for key in keys if waiting[key] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        key = keys[heapq.heappop(ready)]
        order.append(key)
        for child in children[key]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, position[child])
    if len(order) < len(keys):
        raise DecompositionParseError(
            f"dependency cycle among sub-queries {' -> '.join(_find_cycle(keys, deps, waiting))} in output "
            + _excerpt(raw))
    return order


def _find_cycle(keys: list[str], deps: dict[str, list[str]], waiting: dict[str, int]) -> list[str]:
    """Every unsorted node waits on another unsorted one, so walking those edges must revisit a node."""
    stuck = {key for key in keys if waiting[key] > 0}
    path: list[str] = []
    seen: dict[str, int] = {}
    node = next(key for key in keys if key in stuck)
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in stuck)
    cycle = path[seen[node]:] + [node]
    return list(reversed(cycle))  # dependency first: "1 -> 2 -> 1" reads "2 needs 1, 1 needs 2"


def _truncate(text: str, max_chars: int, warnings: list[str], index: int) -> str:
    if len(text) <= max_chars:
        return text
    warnings.append(f"sub-query {index}: text truncated from {len(text)} to {max_chars} chars")
    cut = text[:max_chars]
    partial = re.search(r"#+(\d+)$", cut)
    if partial and text[max_chars].isdecimal():
        # A cut-off "#12" must not become a reference to #1: keep its digits, drop the '#'.
        space = " " if partial.start() and cut[partial.start() - 1].isdecimal() else ""
        cut = cut[: partial.start()] + space + partial.group(1)
    return cut


def _excerpt(raw: str) -> str:
    text = raw.strip() if isinstance(raw, str) else repr(raw)
    return repr(text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else ""))
