"""Data sets that ship inside PyPI packages (located with find_spec, never imported)."""
