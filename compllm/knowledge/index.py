"""A BM25 index (the maintained `bm25s` package) over a corpus, built once and cached next to the model cache.

Layout: `<cache>/knowledge/<corpus>-<corpus sha256[:16]>-bm25s-v1/`, bm25s's own files plus `manifest.json`
listing each file's sha256. A cached index is used only if every file matches its manifest; otherwise it is
rebuilt with a WARNING that says what did not match (never silently used). Builds publish atomically under a
lock, so concurrent processes build it once. BM25 was measured against the shipped MiniLM embeddings on
FanOutQA/StrategyQA items (experiments/bench_retrieval.py, `index_comparison`).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from compllm.knowledge.corpus import Corpus
from compllm.models.cache import cache_root, locked, publish, sha256_file

log = logging.getLogger(__name__)

INDEX_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: what a `retrieve` node answers (a list of these, best first)."""

    id: str
    title: str
    text: str
    score: float

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "text": self.text, "score": round(float(self.score), 4)}


def _tokenize(texts: Sequence[str], return_ids: bool):
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False, return_ids=return_ids)


class BM25Index:
    """`search(queries, k, topics)`: the best `k` passages per query, optionally among passages of some topics."""

    def __init__(self, corpus: Corpus, model, directory: Path | None = None):
        self.corpus, self.model, self.directory = corpus, model, directory
        self._topic_of = np.array([p.topic for p in corpus.passages], dtype=object)
        self._masks: dict[tuple[str, ...], np.ndarray] = {}

    # --- building and caching -------------------------------------------------------------------
    @classmethod
    def build(cls, corpus: Corpus) -> "BM25Index":
        import bm25s

        model = bm25s.BM25()
        model.index(_tokenize([f"{p.title}. {p.text}" for p in corpus.passages], True), show_progress=False)
        return cls(corpus, model)

    @staticmethod
    def cache_path(corpus: Corpus, cache_dir: str | None = None) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", corpus.name).strip("_")[-48:] or "corpus"
        return cache_root(cache_dir) / "knowledge" / f"{slug}-{corpus.sha256[:16]}-bm25s-v{INDEX_VERSION}"

    @classmethod
    def cached(cls, corpus: Corpus, cache_dir: str | None = None) -> "BM25Index":
        """Load the verified cached index, or build it (and cache it) when absent or not matching its manifest."""
        final = cls.cache_path(corpus, cache_dir)
        with locked(final):
            problem = _check(final, corpus) if final.exists() else None
            if final.exists() and problem is None:
                return cls.load(corpus, final)
            if problem is not None:
                log.warning("knowledge index %s failed verification (%s): rebuilding it", final, problem)
                shutil.rmtree(final, ignore_errors=True)
            start = time.perf_counter()
            index = cls.build(corpus)
            index.save(final)
            log.info("built the %s index (%d passages) in %.1fs", corpus.name, len(corpus.passages),
                     time.perf_counter() - start)
            return cls.load(corpus, final)

    def save(self, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            self.model.save(str(tmp), show_progress=False)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"version": INDEX_VERSION, "corpus": self.corpus.name, "corpus_sha256": self.corpus.sha256,
                        "passages": len(self.corpus.passages), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, corpus: Corpus, directory: Path) -> "BM25Index":
        import bm25s

        return cls(corpus, bm25s.BM25.load(str(directory)), directory)

    # --- what the cost model reads --------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the loaded index holds: its sparse score matrix, vocabulary and the passages' text."""
        scores = sum(int(getattr(v, "nbytes", 0)) for v in self.model.scores.values())
        vocab = sum(len(w) + 64 for w in self.model.vocab_dict)  # a dict entry: key string + slot
        text = sum(len(p.text) + len(p.title) + len(p.id) + 3 * 56 for p in self.corpus.passages)
        return scores + vocab + text

    # --- searching ------------------------------------------------------------------------------
    def mask(self, topics: Sequence[str]) -> np.ndarray | None:
        if not topics:
            return None
        key = tuple(sorted(topics))
        if key not in self._masks:
            self._masks[key] = np.isin(self._topic_of, key).astype(np.float32)
        return self._masks[key]

    def search(self, queries: Sequence[str], k: int, topics: Sequence[str] = ()) -> list[list[Hit]]:
        """Best `k` passages per query (score > 0 only: a query sharing no word with the corpus gets none)."""
        if not queries:
            return []
        k = max(1, min(int(k), len(self.corpus.passages)))
        tokens = _tokenize(queries, False)
        out: list[list[Hit]] = []
        mask = self.mask(topics)
        docs, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1, weight_mask=mask)
        passages = self.corpus.passages
        for row_docs, row_scores in zip(docs, scores):
            out.append([Hit(passages[d].id, passages[d].title, passages[d].text, float(s))
                        for d, s in zip(row_docs, row_scores) if s > 0])
        return out


def _check(directory: Path, corpus: Corpus) -> str | None:
    """None when the cached index matches its manifest and `corpus`; else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest: {exc}"
    if manifest.get("version") != INDEX_VERSION or manifest.get("corpus_sha256") != corpus.sha256 \
            or manifest.get("passages") != len(corpus.passages):
        return "built for another corpus or index version"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its sha256"
    return None
