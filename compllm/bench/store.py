"""Append-only JSONL results that survive a SIGKILL: one line per item, flushed and fsynced as it is written.

On resume the file is read back; a torn last line (the process died mid-write) is cut off, so every item ends
up in the file exactly once. A header line pins the run's fingerprint: resuming with a different config is
refused instead of silently mixing results.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class ResultsMismatchError(ValueError):
    """An existing results file was produced by a different configuration."""


def read_lines(path: Path) -> tuple[bytes, list[str]]:
    """(the file's complete bytes, its non-empty lines); a torn tail (no newline yet) is left out."""
    raw = Path(path).read_bytes() if Path(path).exists() else b""
    good = raw[: raw.rfind(b"\n") + 1]
    return good, [ln for ln in good.decode("utf-8").splitlines() if ln.strip()]


def read_results(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) of a results file, read-only: what a report reads, even while a run still writes."""
    _, lines = read_lines(path)
    if not lines:
        return None, []
    return json.loads(lines[0]).get("header"), [json.loads(line) for line in lines[1:]]


class ResultsStore:
    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records: dict[str, dict[str, Any]] = {}
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        good, lines = read_lines(self.path)
        if self.path.exists() and len(good) != self.path.stat().st_size:  # cut the torn tail off for good
            with self.path.open("r+b") as f:
                f.truncate(len(good))
        if not lines:
            self._write({"header": self.fingerprint})
            return
        header = json.loads(lines[0]).get("header")
        if header != self.fingerprint:
            changed = sorted(k for k in {**(header or {}), **self.fingerprint}
                             if (header or {}).get(k) != self.fingerprint.get(k))
            raise ResultsMismatchError(
                f"{self.path} holds results of a different configuration (differs in: {', '.join(changed)}); "
                "resume with the original settings, or delete the file / pick another run dir to start over")
        for line in lines[1:]:
            record = json.loads(line)
            self.records[record["id"]] = record

    def _write(self, obj: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def append(self, record: dict[str, Any]) -> None:
        if record["id"] in self.records:
            raise ValueError(f"item {record['id']} is already in {self.path}")
        self._write(record)
        self.records[record["id"]] = record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records.values())
