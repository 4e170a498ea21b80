"""What a `retrieve` plan step calls: every knowledge source of a team, loaded once per process.

`Retrievers` maps a source key (`KnowledgeConfig.source_key()`: the corpus) to its index; experts reading one
corpus share one index and differ only in their topic mask. It also measures what the cost model needs:
the index's bytes and the seconds one query takes (median of a few probe queries, measured on load).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from compllm.knowledge.config import WIKI, KnowledgeConfig
from compllm.knowledge.corpus import WIKI_TOPICS, KnowledgeError, load_corpus
from compllm.knowledge.index import BM25Index, Hit

PROBES = ("Who wrote Romeo and Juliet?", "What is the capital of Australia?", "When did World War II end?",
          "Which vitamin deficiency causes scurvy?", "How far is the Moon from the Earth?")


@dataclass
class Retriever:
    """One loaded source: its index and measured costs."""

    key: str
    index: BM25Index
    query_s: float  # median seconds per query, measured in a batch of probe queries
    call_s: float  # fixed seconds per search call (tokenizer setup etc.)

    def search(self, queries: Sequence[str], k: int, topics: Sequence[str] = ()) -> list[list[Hit]]:
        return self.index.search(queries, k, topics)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes


class Retrievers(dict):
    """source key -> Retriever."""

    @classmethod
    def for_experts(cls, knowledge: Mapping[str, KnowledgeConfig], cache_dir: str | None = None) -> "Retrievers":
        """Load (building and caching on first use) the index of every source the experts read."""
        out = cls()
        for expert, cfg in knowledge.items():
            check(expert, cfg)
            key = cfg.source_key()
            if key not in out:
                index = BM25Index.cached(load_corpus(cfg.corpus), cache_dir)
                out[key] = Retriever(key, index, *_measure(index))
            if cfg.topics:
                unknown = sorted(set(cfg.topics) - set(out[key].index.corpus.topics))
                if unknown:
                    raise KnowledgeError(f"experts.{expert}.knowledge.topics: {unknown} are not topics of "
                                         f"{key!r}; its topics: {list(out[key].index.corpus.topics)}")
        return out


def check(expert: str, cfg: KnowledgeConfig) -> None:
    """Config errors found before any index is built."""
    if cfg.k < 1 or cfg.max_passage_chars < 20:
        raise KnowledgeError(f"experts.{expert}.knowledge: k must be >= 1 and max_passage_chars >= 20")
    if cfg.corpus == WIKI:
        unknown = sorted(set(cfg.topics) - set(WIKI_TOPICS))
        if unknown:
            raise KnowledgeError(f"experts.{expert}.knowledge.topics: {unknown} are not wiki topics; "
                                 f"choose from {list(WIKI_TOPICS)}")


def _measure(index: BM25Index, repeats: int = 3) -> tuple[float, float]:
    """(seconds per query, seconds per call): one probe alone and the probes together, medians over repeats."""
    one, many = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(PROBES[:1], 2)
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(PROBES, 2)
        many.append(time.perf_counter() - start)
    t1, tn = statistics.median(one), statistics.median(many)
    query_s = max((tn - t1) / (len(PROBES) - 1), 1e-6)
    return query_s, max(t1 - query_s, 0.0)
