"""The built-in passes; importing this package registers them (see `compiler.passes.registry`)."""
from __future__ import annotations

from compiler.passes import batch, cascade, dedupe, fuse, place, prefix, residency, retrieve, schedule  # noqa: F401,E501  (registration)
from compiler.passes.registry import DERIVED, LOWERING_REQUIRES, REGISTRY, Pass, register, rewritten

__all__ = ["DERIVED", "LOWERING_REQUIRES", "REGISTRY", "Pass", "register", "rewritten"]
