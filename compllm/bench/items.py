"""The unit a benchmark is made of: one user query with everything needed to score any system's answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchItem:
    """`kind` picks the scorer: `meqa` (one MMLU letter per part), `fanoutqa` (answer strings), `strategyqa`
    (yes/no). `gold` holds what that scorer needs; `parts` the gold sub-questions (meqa parts carry their MMLU
    domain, fanoutqa its gold decomposition) for the per-stage error analysis."""

    id: str
    kind: str
    query: str
    gold: dict[str, Any]
    parts: tuple[dict[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "query": self.query, "gold": self.gold, "parts": list(self.parts)}
