"""Knowledge sources for experts: corpora, indexes (built once, cached, checksummed), and the retrieval that the
plan's `retrieve` steps run. Nothing here imports torch or an engine."""
from compllm.knowledge.config import KnowledgeConfig
from compllm.knowledge.corpus import Corpus, KnowledgeError, Passage, load_corpus
from compllm.knowledge.index import BM25Index, Hit
from compllm.knowledge.retriever import Retriever, Retrievers

__all__ = ["BM25Index", "Corpus", "Hit", "KnowledgeConfig", "KnowledgeError", "Passage", "Retriever", "Retrievers",
           "load_corpus"]
