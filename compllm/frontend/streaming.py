"""The planner read while it writes: each sub-query is handed out as soon as its text is complete.

The tolerant parser is made incremental by feeding it the output up to the last structural boundary (a closed
JSON object or a finished line): the parts it recovers from that prefix are complete. A part is handed out once
its index follows the last one handed out and it reads only parts already handed out, so what has started is
never renumbered. When the call ends, the whole output is parsed as before; the parts already handed out are
kept (they may be running), and the complete decomposition continues after them.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from compllm.backends.base import Generation
from compllm.frontend.decomposer import Decomposer, Decomposition
from compllm.frontend.parse import DecompositionParseError, SubQuery, parse_decomposition


class StreamingReader:
    """One query's planner output, read incrementally. `on_part(sub-query)` is called for each complete part."""

    def __init__(self, decomposer: Decomposer, query: str, on_part: Callable[[SubQuery], None]):
        self.decomposer, self.query, self.on_part = decomposer, query, on_part
        self.parts: list[SubQuery] = []
        self.parsed_at: list[float] = []  # perf_counter() when each part was handed out
        self._boundary = -1

    def feed(self, text: str) -> None:
        """The output so far (a retried call starts again from scratch; parts already handed out stay)."""
        cut = max(text.rfind("}"), text.rfind("\n"))
        if cut < 0 or cut == self._boundary:
            return  # no complete part, or no new boundary since the last parse
        self._boundary = cut
        try:
            prefix = parse_decomposition(text[: cut + 1], max_subqueries=self.decomposer.max_subqueries,
                                         max_chars=self.decomposer.max_chars)
        except DecompositionParseError:
            return
        for sq in prefix.subqueries[len(self.parts):]:
            if sq.index != len(self.parts) + 1 or any(d > len(self.parts) for d in sq.depends_on):
                break
            sq = replace(sq, answer_type=self.decomposer.answer_type(sq.text)
                         if sq.answer_type == "text" else sq.answer_type)
            self.parts.append(sq)
            self.parsed_at.append(time.perf_counter())
            self.on_part(sq)

    def finish(self, raw: str, generation: Generation | None) -> Decomposition:
        """The complete decomposition; the parts handed out are its first parts, whatever the final parse says."""
        final = self.decomposer.parse(self.query, raw, generation)
        if not self.parts:
            return self.decomposer.keep_closed_form(final)
        n = len(self.parts)
        if not final.fallback and tuple(final.subqueries[:n]) == tuple(self.parts):
            return self.decomposer.keep_closed_form(final)
        later = () if final.fallback else tuple(sq for sq in final.subqueries[n:]
                                                 if all(d <= sq.index for d in sq.depends_on))
        warning = (f"the complete planner output parses differently from its prefix; kept the {n} sub-queries "
                   "already started" + (f" and {len(later)} later one(s)" if later else ""))
        renumbered = tuple(replace(sq, index=n + i + 1, depends_on=tuple(d for d in sq.depends_on if d <= n))
                           for i, sq in enumerate(later))
        return self.decomposer.keep_closed_form(Decomposition(
            final.query, tuple(self.parts) + renumbered, False, "", final.warnings + (warning,), raw,
            final.format or "json", generation, final.omitted))
