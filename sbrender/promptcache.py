"""A bounded cache of encoded prompts: a repeated prompt skips the text encoder.

Keyed by everything the embeddings depend on (the caller builds the key: text,
clip skip, the schedule's step count, the embeddings folder's state and the
text encoder's active LoRA weights). Bounded in bytes; the least recently used
entry leaves first. Lives with the renderer, on its thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class PromptCache(Generic[Value]):
    def __init__(self, budget_bytes: int, size: Callable[[Value], int]) -> None:
        self.budget = budget_bytes
        self.size = size
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Value]) -> Value:
        """The value for ``key``, made (and kept, within the budget) on a miss."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = make()
        cost = self.size(value)
        if cost <= self.budget:
            self._entries[key] = value
            self.used += cost
            while self.used > self.budget:
                _, old = self._entries.popitem(last=False)
                self.used -= self.size(old)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0
