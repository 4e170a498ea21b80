"""Errors the compiler raises beyond the IR invariants of `compiler.verify`.

`CompileError` means the user can fix it (a bigger budget, a valid config); `PassError` means a pass
(ours or a plugged-in one) produced an invalid graph, which is a bug to report, not a bad input.
"""
from __future__ import annotations


class CompileError(ValueError):
    """The graph is valid but cannot be compiled under this configuration."""


class ConfigError(CompileError):
    """A `CompilerConfig` or cost-model field is out of range or names something unknown."""


class MemoryBudgetError(CompileError):
    """A model (with its smallest possible KV working set) does not fit the memory budget at all."""

    def __init__(self, model: str, needed_bytes: int, budget_bytes: int, detail: str = ""):
        self.model, self.needed_bytes, self.budget_bytes = model, needed_bytes, budget_bytes
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"model {model!r} needs {needed_bytes:,} bytes{extra} but the memory budget is {budget_bytes:,} bytes "
            f"({needed_bytes - budget_bytes:,} bytes short)"
        )


class PassError(RuntimeError):
    """A pass broke an IR invariant; the message names the pass and keeps the verifier's message."""

    def __init__(self, pass_name: str, error: Exception):
        self.pass_name, self.error = pass_name, error
        super().__init__(f"pass {pass_name!r} broke an IR invariant: {type(error).__name__}: {error}")
