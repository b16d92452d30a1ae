"""KV states of prompts a shared model has turned away from, kept to be restored.

One llama.cpp context serves every conversation, one request at a time. When it turns to
another conversation, the prompt it held is overwritten, and reading it again costs seconds
(400 tokens of history take ~4 s for the 1.5B model on 2 cores). Its KV state is ~12 MB and
restores in ~5 ms, so the backend keeps the states it leaves and, before each request,
restores the one that shares the most with the new prompt.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


State = mmap.mmap | bytes  # llama_state_seq_get_data's bytes (mmap: see LlamaBackend)


@dataclass(frozen=True, slots=True)
class SavedPrompt:
    tokens: tuple[int, ...]
    state: State


class PromptCache:
    """Saved prompts, least recently used dropped first, at most ``budget_bytes`` in all.

    A saved prompt that differs from a newly saved one only in its last ``distinct_tokens``
    or fewer (and a quarter at most) is dropped: it is the same conversation, one turn
    earlier (its last reply as generated, where the new prompt has it as spoken), and will
    not be asked for again.
    """

    def __init__(self, budget_bytes: int, distinct_tokens: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.distinct_tokens = distinct_tokens
        self._saved: OrderedDict[tuple[int, ...], SavedPrompt] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._saved)

    def refresh(self, tokens: Sequence[int]) -> bool:
        """Whether a saved prompt starts with all of ``tokens`` (saving them would add
        nothing); it is then counted as just used."""
        for key in self._saved:
            if shared_prefix(key, tokens) == len(tokens):
                self._saved.move_to_end(key)
                return True
        return False

    def put(self, tokens: Sequence[int], state: State) -> None:
        key = tuple(tokens)
        if len(state) > self.budget_bytes or self.refresh(key):
            return
        for older in [k for k in self._saved if self._superseded(k, key)]:
            self._drop(older)
        self._saved[key] = SavedPrompt(key, state)
        self.bytes += len(state)
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._saved)))

    def _superseded(self, older: tuple[int, ...], newer: tuple[int, ...]) -> bool:
        """``newer`` covers ``older``, or all but its last few tokens, and they are not two
        conversations that share only their start (the system prompt)."""
        shared = shared_prefix(older, newer)
        return len(older) - shared <= self.distinct_tokens and 4 * shared >= 3 * len(older)

    def best(self, tokens: Sequence[int]) -> tuple[SavedPrompt, int] | None:
        """The saved prompt sharing the longest prefix with ``tokens``, and that length."""
        found = max(
            ((saved, shared_prefix(key, tokens)) for key, saved in self._saved.items()),
            key=lambda pair: pair[1],
            default=None,
        )
        return None if found is None or found[1] == 0 else found

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= len(self._saved.pop(key).state)
