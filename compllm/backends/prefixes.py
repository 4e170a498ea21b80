"""Which token prefixes an in-process engine keeps the KV of, and which one a prompt reuses (pure Python).

The llama.cpp backend saves the KV of a shared prefix as a sequence state (`llama_state_seq_get_data`) and restores
it into every row whose prompt starts with it. This module decides what is worth saving and finds the best saved
prefix for a prompt; it holds the states as opaque bytes, least recently used dropped first past `max_bytes`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), max(limit, 0))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_groups(prompts: Sequence[Sequence[int]], min_shared: int, keep: int) -> list[tuple[list[int], list[int]]]:
    """Groups of >= 2 prompts sharing a prefix of >= `min_shared` tokens, as (prefix, prompt indices), outer groups
    before the groups nested in them.

    Prompts are sorted; neighbours whose common prefix is >= `min_shared` chain into a group whose prefix is the
    shortest such common prefix (every prompt keeps `keep` tokens of its own); within it, the runs of neighbours
    sharing more form nested groups with longer prefixes. Rows of two experts whose system prompts start alike: one
    group for the common start, one nested group per expert for its whole system prompt."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    links = [common_prefix(prompts[a], prompts[b], min(len(prompts[a]), len(prompts[b])) - keep)
             for a, b in zip(order, order[1:])]
    groups: list[tuple[list[int], list[int]]] = []

    def split(lo: int, hi: int, floor: int) -> None:
        """Emit the groups among order[lo..hi] (inclusive) whose neighbours share more than `floor` tokens."""
        start = lo
        for i in range(lo, hi + 1):
            if i == hi or links[i] <= floor:
                if i > start:
                    shared = min(links[start:i])
                    groups.append((list(prompts[order[start]][:shared]), [order[j] for j in range(start, i + 1)]))
                    split(start, i, shared)
                start = i + 1

    split(0, len(order) - 1, min_shared - 1)
    return groups


class PrefixStore:
    """Saved KV states keyed by their tokens; `best` finds the one sharing the longest prefix with a prompt."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens whose KV the store holds (summed over entries)."""
        return sum(len(k) for k in self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def best(self, ids: Sequence[int], limit: int) -> tuple[tuple[int, ...] | None, int]:
        """(entry, n): the saved prefix sharing the most tokens (n, at most `limit`) with `ids`; (None, 0) if none."""
        best, best_n = None, 0
        for key in self._entries:
            n = common_prefix(key, ids, limit)
            if n > best_n or (n == best_n and best is not None and n and len(key) < len(best)):
                best, best_n = key, n
        return best, best_n

    def get(self, key: tuple[int, ...]) -> bytes:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Sequence[int], state: bytes, pinned: set[tuple[int, ...]] = frozenset()) -> tuple[int, ...]:
        """Save `state` for `key`; drop least recently used entries (never `pinned` ones) past `max_bytes`."""
        key = tuple(key)
        if key in self._entries:
            self._bytes -= len(self._entries.pop(key))
        self._entries[key] = state
        self._bytes += len(state)
        for old in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            if old != key and old not in pinned:
                self._bytes -= len(self._entries.pop(old))
        return key

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
