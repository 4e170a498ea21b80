"""The calibration file, `<cache>/calibration.json`: one entry per model x device x dtype x decode kernel.

An entry is a `ModelCost` (timings and memory) plus a few metadata keys (`protocol`, `measured_at`, `rounds`,
`spread`, `others_cpu`). Entries written by an older protocol (no `protocol` key, or a lower one) lack the memory
numbers, so they are treated as absent and measured again. A garbled file or entry is never trusted and never
crashes a run: it is ignored with one WARNING, and the next save replaces it.

File I/O goes through `_read_file` / `_write_file` only, so they can switch to the model cache's checked JSON
helpers (payload + sha256) without touching anything else.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from compiler.cost import ModelCost
from compiler.errors import ConfigError
from compllm.models.cache import cache_root, read_checked_json, write_checked_json

log = logging.getLogger(__name__)

PROTOCOL = 2  # 2: memory measured with the timings (weight/load/workspace bytes); 1: timings only
FILENAME = "calibration.json"
LOCK_TIMEOUT_S = 15 * 60.0  # longer than any calibration; a holder that died released the lock already
_COST_FIELDS = {f.name for f in fields(ModelCost)}


def calibration_path(cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / FILENAME


def _read_file(path: Path) -> dict[str, Any] | None:
    """The file's JSON object; None (and a WARNING) when it is unreadable, fails its checksum or is not an object
    (it is rewritten at the next calibration), {} when absent."""
    if not path.is_file():
        return {}
    data = read_checked_json(path)  # WARNs with the reason when it returns None
    if data is not None and not isinstance(data, dict):
        log.warning("ignoring calibration file %s: not a JSON object; it is rewritten at the next calibration", path)
        return None
    return data


def _write_file(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically and with its checksum: readers see the old file or the new one, never half or a garbled one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checked_json(path, dict(data))


@dataclass(frozen=True)
class Entry:
    """One model's stored calibration."""

    cost: ModelCost
    meta: Mapping[str, Any]


def parse_entry(key: str, raw: Any) -> Entry | None:
    """A stored entry, or None when it is garbled (WARNING) or from an older protocol (re-measured)."""
    if not isinstance(raw, Mapping):
        log.warning("ignoring calibration entry %s: not a JSON object", key)
        return None
    if not isinstance(raw.get("protocol"), int) or raw["protocol"] < PROTOCOL:
        log.info("calibration entry %s predates memory measurement (protocol %s < %d): measuring again",
                 key, raw.get("protocol", 1), PROTOCOL)
        return None
    try:
        cost = ModelCost(**{k: v for k, v in raw.items() if k in _COST_FIELDS})
        served = "|remote|" in key  # a served model holds no local memory (calibration.build.remote_key)
        if not ((cost.weight_bytes > 0 or served) and cost.prefill_s_per_token > 0 and cost.decode_s_per_token > 0):
            raise ConfigError("weights and timings must be positive")
    except (TypeError, ValueError, ConfigError) as exc:
        log.warning("ignoring garbled calibration entry %s (%s)", key, exc)
        return None
    return Entry(cost, {k: v for k, v in raw.items() if k not in _COST_FIELDS})


class CalibrationStore:
    """Read, merge, drop and lock the calibration entries under one cache root."""

    def __init__(self, cache_dir: str | None):
        self.path = calibration_path(cache_dir)

    def entries(self) -> dict[str, Entry]:
        data = _read_file(self.path) or {}
        parsed = {key: parse_entry(key, raw) for key, raw in data.items()}
        return {key: entry for key, entry in parsed.items() if entry is not None}

    def get(self, key: str) -> Entry | None:
        return self.entries().get(key)

    def previous(self, key: str) -> ModelCost | None:
        """The costs stored under `key` by any protocol (an older one lacks memory numbers), or None."""
        raw = (_read_file(self.path) or {}).get(key)
        if not isinstance(raw, Mapping):
            return None
        try:
            return ModelCost(**{k: v for k, v in raw.items() if k in _COST_FIELDS})
        except (TypeError, ValueError, ConfigError):
            return None

    def save(self, key: str, cost: ModelCost, **meta: Any) -> Path:
        """Merge one entry (other entries, even ones this version does not understand, are kept)."""
        data = _read_file(self.path) or {}
        data[key] = {**asdict(cost), **meta, "protocol": PROTOCOL,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_file(self.path, data)
        return self.path

    def drop(self, key: str) -> bool:
        """Remove one entry so the next run measures it again; False when it was not there."""
        data = _read_file(self.path)
        if not data or key not in data:
            return False
        del data[key]
        _write_file(self.path, data)
        return True

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
        """Hold the machine-wide calibration lock (one calibration at a time: two at once slow each other down
        and both store inflated numbers). Yields False when it could not be had within `timeout` seconds."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path.parent / f".{self.path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process calibrating on this machine (lock %s)", lock.lock_file)
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                log.warning("gave up waiting %.0f s for the calibration lock %s, held by another process",
                            timeout, lock.lock_file)
                yield False
                return
        try:
            yield True
        finally:
            lock.release()
