"""The on-disk cache: where it lives, and writes that are atomic and safe across processes.

Layout under the cache root:
  gguf/<filename>            GGUFs assembled from package parts, with a `<filename>.sha256` sidecar
  hf/<sha256[:16]>-<dtype>/  GGUFs converted to safetensors HF directories, complete only with `.complete`
  verified/<key>.json        sha256 of files hashed in place, keyed by path + size + mtime
Anything under a final name got there by `os.replace` after it was complete, so a killed process leaves
only `.tmp-` names behind, which the next builder removes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

CACHE_ENV = "COMPLLM_CACHE"
MARKER = ".complete"
CHUNK = 8 << 20  # 8 MiB: hashing speed plateaus here, memory stays small


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """Config value, else $COMPLLM_CACHE, else $XDG_CACHE_HOME/compllm, else ~/.cache/compllm."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "compllm"
    return Path.home() / ".cache" / "compllm"


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold `.<target>.lock` so only one process builds `target`; others wait, then find it done."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))  # hidden: listings show only entries
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def temp_path(final: Path) -> Iterator[Path]:
    """A fresh temp file name beside `final` (same filesystem, so `os.replace` is atomic); removed if left over."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    with temp_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)


def publish(tmp: Path, final: Path, mode: int = 0o644) -> None:
    """Give a finished temp file or dir its final name atomically (mkstemp/mkdtemp made it owner-only)."""
    os.chmod(tmp, mode | (0o111 if tmp.is_dir() else 0))
    os.replace(tmp, final)


def sha256_file(path: str | os.PathLike[str], chunk: int = CHUNK) -> str:
    """Hash in chunks: GGUFs are up to gigabytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike[str], root: Path) -> str:
    """sha256 of a file outside the cache, hashed once per (path, size, mtime) and remembered under verified/."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    record = root / "verified" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(record.read_text(encoding="utf-8"))
        if data["path"] == real and data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns:
            return str(data["sha256"])
    start = time.perf_counter()
    digest = sha256_file(real)
    log.info("hashed %s (%.0f MB) in %.1fs", real, st.st_size / 1e6, time.perf_counter() - start)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    return digest


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's metadata, or None when the directory is absent or incomplete."""
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(directory: Path, expect: Mapping[str, Any] | None = None) -> bool:
    """Complete = has the marker, and the marker agrees with every `expect` item (e.g. source sha256, dtype)."""
    meta = read_marker(directory)
    return meta is not None and all(meta.get(k) == v for k, v in (expect or {}).items())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def build_dir(final: Path, build: Callable[[Path], None], meta: Mapping[str, Any]) -> Path:
    """Return `final`, building it first unless complete: build into a temp dir, write the marker last, rename.

    Under a file lock, so concurrent processes build once. A `final` without a matching marker
    (half-written by an older tool, or from a different source) and stale temp dirs are removed first.
    """
    expect = {k: meta[k] for k in ("source_sha256", "dtype") if k in meta}
    if is_complete(final, expect):
        return final
    with locked(final):
        if is_complete(final, expect):  # another process finished while we waited
            return final
        if final.exists():
            log.warning("cache entry %s is incomplete (no valid %s marker): removing and rebuilding", final, MARKER)
            _remove(final)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            log.info("removing leftover temp %s from an interrupted build", stale)
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(dict(meta), indent=2, sort_keys=True), encoding="utf-8")
            publish(tmp, final)
        finally:
            _remove(tmp)
    return final
