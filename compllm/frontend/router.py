"""Route each sub-query to the expert whose description/exemplars it is most similar to."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from compllm.experts import Expert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    expert: str
    score: float  # cosine similarity to the chosen expert's closest routing text
    routed_by: str  # "router", or "fallback" when the best score was under the threshold
    scores: Mapping[str, float]  # every expert's score, for explain/trace


class RouterError(ValueError):
    pass


class EmbeddingRouter:
    """Sentence-transformers similarity routing.

    Each expert is scored by its *closest* routing text (description or an exemplar): exemplars
    cover phrasings a single description misses. Below `threshold` the `fallback_expert` takes the
    sub-query, so a vague question never lands on a confidently wrong specialist.
    """

    def __init__(self, embedding_model: Any, threshold: float = 0.2, fallback_expert: str = "general",
                 device: str = "cpu", batch_size: int = 64):
        self.embedding_model = embedding_model
        self.threshold = threshold
        self.fallback_expert = fallback_expert
        self.device = device
        self.batch_size = batch_size
        self._encoder = None
        self._names: list[str] = []
        self._owner: list[int] = []
        self._matrix = None
        self.fit_seconds = 0.0

    def _load_encoder(self):
        if self._encoder is None:
            from hydra.utils import instantiate
            from sentence_transformers import SentenceTransformer

            source = self.embedding_model
            if isinstance(source, Mapping) or hasattr(source, "keys"):
                source = instantiate(source)
            path = source.materialize().path if hasattr(source, "materialize") else str(source)
            self._encoder = SentenceTransformer(path, device=self.device)
        return self._encoder

    def fit(self, experts: Mapping[str, Expert]) -> None:
        """Embed every expert's routing texts once."""
        if self.fallback_expert not in experts:
            raise RouterError(
                f"router fallback_expert {self.fallback_expert!r} is not a configured expert; "
                f"configured: {', '.join(experts)}"
            )
        start = time.perf_counter()
        texts: list[str] = []
        self._names, self._owner = list(experts), []
        for i, name in enumerate(self._names):
            for text in experts[name].routing_texts():
                texts.append(text)
                self._owner.append(i)
        self._matrix = self._encode(texts)
        self.fit_seconds = time.perf_counter() - start

    def _encode(self, texts: Sequence[str]):
        return self._load_encoder().encode(
            list(texts), batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )

    def route(self, texts: Sequence[str]) -> list[Route]:
        import torch

        if self._matrix is None:
            raise RouterError("router.fit(experts) must run before route()")
        if not texts:
            return []
        sims = self._encode(texts) @ self._matrix.T  # (queries, routing texts), cosine since normalized
        owner = torch.tensor(self._owner, device=sims.device)
        per_expert = torch.full((len(texts), len(self._names)), -1.0, device=sims.device)
        per_expert = per_expert.scatter_reduce(1, owner.expand(len(texts), -1), sims.float(), reduce="amax")
        routes = []
        for row in per_expert.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            scores = {n: round(s, 4) for n, s in zip(self._names, row)}
            if row[best] < self.threshold:
                routes.append(Route(self.fallback_expert, row[best], "fallback", scores))
            else:
                routes.append(Route(self._names[best], row[best], "router", scores))
        return routes
