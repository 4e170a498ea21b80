"""compllm's compiler: IR, passes, cost model, lowering to a Plan. Pure Python, no torch.

Entry point: `compiler.compile(graph, cost_model, CompilerConfig(...)) -> Plan`. Names are loaded
lazily, so `import compiler.ir` stays as cheap as the IR itself.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compile": "compiler.pipeline",
    "CompileReport": "compiler.pipeline",
    "CompilerConfig": "compiler.config",
    "PassContext": "compiler.config",
    "CostModel": "compiler.cost",
    "ModelCost": "compiler.cost",
    "Plan": "compiler.plan",
    "Step": "compiler.plan",
    "StepKind": "compiler.plan",
    "PassManager": "compiler.pass_manager",
    "CompileError": "compiler.errors",
    "MemoryBudgetError": "compiler.errors",
    "PassError": "compiler.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
