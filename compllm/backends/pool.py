"""Model aliases -> loaded backends, one shared copy per distinct weights/dtype/device."""
from __future__ import annotations

import enum

import gc
import logging
import threading
import weakref
from typing import Any, Mapping

from compllm.backends.base import Backend, BackendError
from compllm.models.cache import CACHE_DTYPE

log = logging.getLogger(__name__)


class NotResidentError(RuntimeError):
    """A plan step used a model the plan had not loaded: a compiler or executor bug, never retried."""


class ModelPool:
    """Loads models lazily by alias; experts naming the same model share one loaded copy."""

    def __init__(self, models: Mapping[str, Mapping[str, Any]], cache_dir: str | None = None):
        self.specs = {alias: _plain(spec) for alias, spec in models.items()}
        self.cache_dir = cache_dir
        self._loaded: dict[tuple, Backend] = {}
        self._faulty: dict[str, Backend] = {}  # alias -> fault-injection wrapper (models.<alias>.fault_injection)
        self._lock = threading.Lock()

    def spec(self, alias: str) -> dict:
        try:
            return self.specs[alias]
        except KeyError:
            raise BackendError(f"unknown model {alias!r}; configured models: {', '.join(self.specs) or '(none)'}") from None

    def _key(self, alias: str) -> tuple:
        """What makes two aliases one loaded model: the same weights, dtype and device (or the same server)."""
        spec = self.spec(alias)
        if spec.get("backend") == "openai":
            server = dict(spec.get("server") or {})
            return ("openai", server.get("base_url"), server.get("model"))
        if spec.get("backend") == "llamacpp":  # its own copy of the GGUF, per llama.cpp settings
            return ("llamacpp", repr(sorted(dict(spec["source"]).items())),
                    repr(sorted(dict(spec.get("llamacpp") or {}).items())))
        return (repr(sorted(dict(spec["source"]).items())), spec.get("dtype", "auto"), spec.get("device", "auto"))

    def get(self, alias: str) -> Backend:
        """The alias's backend, loading it first if needed (plan `load` steps, the frontend, calibration)."""
        key = self._key(alias)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(alias)
            return self._with_faults(alias, self._loaded[key])

    def resident(self, alias: str) -> Backend:
        """The alias's loaded backend; a generate step never loads: the plan said the model is resident."""
        key = self._key(alias)
        with self._lock:
            if key not in self._loaded:
                raise NotResidentError(f"model {alias!r} is not loaded, but a plan step uses it: the plan's load "
                                       "steps and this run disagree (a compiler or executor bug)")
            return self._with_faults(alias, self._loaded[key])

    def is_loaded(self, alias: str) -> bool:
        return self._key(alias) in self._loaded

    def _with_faults(self, alias: str, backend: Backend) -> Backend:
        """Per alias, not per weights: aliases sharing one copy can be chaos-tested independently."""
        faults = self.spec(alias).get("fault_injection") or {}
        if not faults.get("enabled"):
            return backend
        from compllm.backends.faulty import FaultSettings, FaultyModel

        wrapper = self._faulty.get(alias)
        if wrapper is None:
            wrapper = self._faulty[alias] = FaultyModel(backend, FaultSettings(**faults))
        wrapper.inner = backend  # after an evict + reload, the same seeded wrapper goes on
        return wrapper

    def evict(self, alias: str) -> None:
        """Drop this alias's weights (and every alias sharing them) so their memory is really freed: fault
        wrappers let go of them too, and a weak reference checks that nothing else still holds the model."""
        key = self._key(alias)
        with self._lock:
            model = self._loaded.pop(key, None)
            for other, wrapper in self._faulty.items():
                if self._key(other) == key:
                    wrapper.inner = None
        if model is None:
            return
        close = getattr(model, "close", None)
        if close is not None:
            close()
        gone = weakref.ref(model)
        del model
        gc.collect()
        import sys

        torch = sys.modules.get("torch")  # only if a backend imported it
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if gone() is not None:
            log.warning("model %r is still referenced after eviction (%s); its memory is not freed", alias,
                        ", ".join(type(r).__name__ for r in gc.get_referrers(gone()))[:200])

    def loaded(self) -> dict[str, Backend]:
        """Alias -> backend for every alias whose weights are currently loaded."""
        return {a: self._loaded[self._key(a)] for a in self.specs if self._key(a) in self._loaded}

    def _load(self, alias: str) -> Backend:
        spec = self.spec(alias)
        backend = spec.get("backend", "hf")
        if backend == "openai":
            from compllm.backends.openai_server import OpenAIServerModel, ServerConfig

            return OpenAIServerModel(spec.get("name", alias), ServerConfig(**spec["server"]), alias)
        if backend == "llamacpp":
            from hydra.utils import instantiate

            from compllm.backends.llamacpp import LlamaCppModel, LlamaCppSettings
            from compllm.models.sources import gguf_file

            path = gguf_file(instantiate(spec["source"]), cache_dir=self.cache_dir)
            return LlamaCppModel(spec.get("name", alias), str(path), LlamaCppSettings(**(spec.get("llamacpp") or {})))
        if backend != "hf":
            raise BackendError(f"model {alias!r}: backend {backend!r} is not available (known: hf, openai, llamacpp)")
        from hydra.utils import instantiate

        from compllm.backends.hf import HFModel

        source = instantiate(spec["source"])
        resolved = source.materialize(cache_dir=self.cache_dir, dtype=CACHE_DTYPE)
        return HFModel(
            name=spec.get("name", alias),
            path=resolved.path,
            gguf_file=resolved.gguf_file,
            revision=resolved.revision,
            dtype=spec.get("dtype", "auto"),
            device=spec.get("device", "auto"),
            decode_matmul=spec.get("decode_matmul", "auto"),
        )


def _plain(value: Any) -> Any:
    """A model spec with config Enums (Backend, Dtype, ...) as their names, so every reader sees plain strings."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return getattr(value, "value", value) if isinstance(value, enum.Enum) else value
