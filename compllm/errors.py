"""Every exception type that means "the user can fix this": apps print its message, not a traceback."""
from __future__ import annotations

from compiler.errors import CompileError
from compiler.verify import GraphError
from compllm.backends.base import BackendError
from compllm.bench.store import ResultsMismatchError
from compllm.config.checks import ConfigError
from compllm.frontend.router import RouterError
from compllm.knowledge.corpus import KnowledgeError
from compllm.models.errors import ModelSourceError

KNOWN_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, ModelSourceError, BackendError, GraphError, RouterError, CompileError, ResultsMismatchError,
    KnowledgeError,
)
