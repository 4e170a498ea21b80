"""The on-disk cache: where it lives, and writes that are atomic and safe across processes.

Layout under the cache root:
  gguf/<filename>            GGUFs assembled from package parts, with a `<filename>.sha256` sidecar
                             (`sha256sum -c` format); re-hashed whenever its stat key changed
  hf/<sha256[:16]>-<dtype>/  GGUFs converted to safetensors HF directories, complete only with `.complete`,
                             which lists the size and sha256 of every file; `.verified.json` beside it holds
                             the stat key at which each file last matched, so a load re-hashes changed files only
  verified/<key>.json        sha256 of a file hashed at one stat key (path + size + mtime + ctime + inode)
  calibration.json etc.      small JSON state written with `write_checked_json` (payload + its sha256)
A stat key is (size, mtime_ns, ctime_ns, inode): any write changes ctime, which user space cannot set back,
and a replaced file has a new inode; so an unchanged key means unchanged bytes (short of a disk fault).
Anything under a final name got there by `os.replace` after it was complete, so a killed process leaves
only `.tmp-` names behind, which the next builder removes. A converted entry that fails verification
(a file missing, truncated or garbled, or no manifest because an older compllm wrote it) is removed with a
WARNING and built again, under the same lock.
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
#: The dtype converted weights are stored in: half the bytes of fp32 and lossless for dequantized 4-bit weights;
#: the compute dtype is chosen when a model loads.
CACHE_DTYPE = "bfloat16"
MARKER = ".complete"
VERIFIED = ".verified.json"  # inside a converted entry: file -> stat key at which it last matched the manifest
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


def stat_key(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: (size, mtime_ns, ctime_ns, inode).

    ctime is set by every write and by `utime`, and cannot be set back from user space; a file replaced
    by another has a new inode. So an unchanged key means unchanged bytes, short of a disk fault.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _record_path(real: str, key: list[int], root: Path) -> Path:
    return root / "verified" / (hashlib.sha256(f"{real}\0{key}".encode()).hexdigest()[:32] + ".json")


def cached_sha256(path: str | os.PathLike[str], root: Path) -> str:
    """sha256 of a file, hashed once per (path, stat key) and remembered under verified/."""
    real = os.path.realpath(path)
    key = stat_key(os.stat(real))
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(_record_path(real, key, root).read_text(encoding="utf-8"))
        if data["path"] == real and data["stat"] == key:
            return str(data["sha256"])
    start = time.perf_counter()
    digest = sha256_file(real)
    log.info("hashed %s (%.0f MB) in %.1fs", real, key[0] / 1e6, time.perf_counter() - start)
    if stat_key(os.stat(real)) == key:  # not written to while we read it
        remember_sha256(real, digest, root, key)
    return digest


def remember_sha256(path: str | os.PathLike[str], digest: str, root: Path, key: list[int] | None = None) -> None:
    """Record a digest computed while writing the file, so the next `cached_sha256` need not read it again."""
    real = os.path.realpath(path)
    key = key or stat_key(os.stat(real))
    record = _record_path(real, key, root)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"path": real, "stat": key, "sha256": digest}))


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's metadata, or None when the directory is absent or incomplete."""
    try:
        meta = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(directory: Path, expect: Mapping[str, Any] | None = None) -> bool:
    """Complete = has the marker, and the marker agrees with every `expect` item (e.g. source sha256, dtype).

    Reads only the marker (compose-time checks use it); `entry_problem` also verifies the files.
    """
    meta = read_marker(directory)
    return meta is not None and all(meta.get(k) == v for k, v in (expect or {}).items())


# ---------------------------------------------------------------- file manifests of converted entries


def _entry_files(directory: Path) -> list[str]:
    """Relative paths of the payload files; hidden names (marker, sidecar, temps) are the cache's bookkeeping."""
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if not any(part.startswith(".") for part in rel.parts) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def seal(directory: Path, meta: Mapping[str, Any]) -> None:
    """Write the marker with a manifest (size + sha256 of every file) and the stat keys they were hashed at."""
    files, keys = {}, {}
    for name in _entry_files(directory):
        before = stat_key((directory / name).stat())
        files[name] = {"size": before[0], "sha256": sha256_file(directory / name)}
        if stat_key((directory / name).stat()) == before:
            keys[name] = before
    _write_verified(directory, keys)
    (directory / MARKER).write_text(json.dumps({**meta, "files": files}, indent=2, sort_keys=True), encoding="utf-8")


def _read_verified(directory: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((directory / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verified(directory: Path, keys: Mapping[str, list[int]]) -> None:
    """Best effort: without the sidecar (read-only cache, entry being removed) a load just hashes again."""
    try:
        atomic_write_text(directory / VERIFIED, json.dumps(dict(keys), sort_keys=True))
    except OSError as exc:
        log.debug("cannot record verified files in %s: %s", directory, exc)


def _file_problem(path: Path, want: Mapping[str, Any], seen: Any) -> tuple[str | None, list[int] | None]:
    """(what is wrong with one manifest file or None, the stat key to remember when it matched)."""
    size, sha = want.get("size"), want.get("sha256")
    if not isinstance(size, int) or not isinstance(sha, str):
        return "has a malformed manifest entry", None
    try:
        key = stat_key(path.stat())
        if key[0] != size:
            return f"has {key[0]:,} bytes, expected {size:,} (truncated or overwritten)", None
        if key == seen:
            return None, key  # unchanged since it last matched: no need to read it
        digest = sha256_file(path)
        unchanged = stat_key(path.stat()) == key
    except FileNotFoundError:
        return "is missing", None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})", None
    if digest != sha:
        return f"has sha256 {digest[:16]}..., expected {sha[:16]}... (same size: garbled)", None
    return None, key if unchanged else None


def entry_problem(directory: Path, expect: Mapping[str, Any] | None = None) -> str | None:
    """Why `directory` must not be loaded, or None when it may: marker, `expect` items, then every file.

    Cheap on the hot path: a file is re-hashed only when its stat key differs from the one it last matched at.
    """
    meta = read_marker(directory)
    if meta is None:
        return "is absent" if not directory.exists() else f"is incomplete (no valid {MARKER} marker)"
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            return f"was built for {k}={meta.get(k)!r}, not {v!r}"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "has no file manifest (written by an older compllm, so it cannot be verified)"
    seen, fresh = _read_verified(directory), {}
    for name, want in sorted(files.items()):
        problem, key = _file_problem(directory / name, want if isinstance(want, dict) else {}, seen.get(name))
        if problem:
            return f"file {name} {problem}"
        if key is not None:
            fresh[name] = key
    try:
        extra = sorted(set(_entry_files(directory)) - set(files))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if extra:
        return f"holds file(s) its manifest does not list: {', '.join(extra)}"
    if fresh != seen:
        _write_verified(directory, fresh)
    return None


# ---------------------------------------------------------------- building entries


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(final: Path) -> None:
    """Move a bad entry out of the way in one rename, then delete it: readers never see it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-discard-", dir=final.parent))
    try:
        os.replace(final, trash)  # an empty directory may be replaced by a directory
    except OSError:
        _remove(final)
    _remove(trash)


def build_dir(final: Path, build: Callable[[Path], None], meta: Mapping[str, Any]) -> Path:
    """Return `final`, verified, building it first unless it passes: build into a temp dir, seal it, rename.

    Under a file lock, so concurrent processes build once. A `final` that fails `entry_problem`
    (half-written, corrupted, from a different source, or without a manifest) is removed with a WARNING
    naming what was wrong; stale temp dirs of interrupted builds are removed too.
    """
    expect = {k: meta[k] for k in ("source_sha256", "dtype") if k in meta}
    if entry_problem(final, expect) is None:
        return final
    with locked(final):
        problem = entry_problem(final, expect)  # again: another process may have rebuilt it while we waited
        if problem is None:
            return final
        if final.exists() or final.is_symlink():
            log.warning("cache entry %s %s: removing it and building it again", final, problem)
            _discard(final)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            log.info("removing leftover temp %s from an interrupted build", stale)
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            seal(tmp, meta)  # after build: `meta` may have been completed by it
            publish(tmp, final)  # renaming the directory leaves its files' stat keys as sealed
        finally:
            _remove(tmp)
    return final


# ---------------------------------------------------------------- JSON that is checked, not trusted


def _canonical_sha256(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_checked_json(path: Path, data: Any) -> None:
    """Store `data` with the sha256 of its canonical JSON, atomically, for `read_checked_json`."""
    payload = json.loads(json.dumps(data))  # what a reader will get back (tuples -> lists, keys -> str)
    envelope = {"sha256": _canonical_sha256(payload), "data": payload}
    atomic_write_text(Path(path), json.dumps(envelope, indent=2, sort_keys=True) + "\n")


def read_checked_json(path: Path) -> Any | None:
    """The data `write_checked_json` stored, or None: absent silently, otherwise with one WARNING saying why."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return _ignored(path, f"it is unreadable ({exc})")
    try:
        envelope = json.loads(text)
    except ValueError as exc:
        return _ignored(path, f"it is not JSON ({exc})")
    if not isinstance(envelope, dict) or set(envelope) != {"sha256", "data"}:
        return _ignored(path, "it has no checksum (not written by write_checked_json, or by an older compllm)")
    if _canonical_sha256(envelope["data"]) != envelope["sha256"]:
        return _ignored(path, "its checksum does not match its content (edited or corrupted)")
    return envelope["data"]


def _ignored(path: Path, why: str) -> None:
    log.warning("ignoring %s: %s", path, why)
    return None
