"""The one thread a model's requests run on, replies before pre-fills.

A llama.cpp context does one thing at a time, and every conversation shares it. A pre-fill
only makes a later reply sooner, while a reply is what a caller is waiting for: so a waiting
reply always goes before a waiting pre-fill (first come, first served within each), and one
conversation reading ahead never holds up another's answer. A request already running is not
interrupted, but a long one can look whether others wait (``waiting``), stop, and queue
again for the rest: a generating reply does so every few tokens (llm.backend).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any, TypeVar

T = TypeVar("T")


class Priority(IntEnum):
    REPLY = 0  # a reply's first words: someone is waiting in silence
    CONTINUATION = 1  # the rest of a reply that let another have the model
    READ_AHEAD = 2
    CLOSE = 3  # after everything already queued


class ModelWorker:
    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future[Any]]]
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()  # first come, first served within a priority
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, priority: Priority, work: Callable[[], T]) -> T:
        """``work()`` on the model's thread once its turn comes. A caller cancelled while it
        waits leaves the queue; one cancelled while its work runs leaves it running (the
        model stays consistent, and the next request starts after it)."""
        future: Future[T] = Future()
        self._queue.put((priority, next(self._order), work, future))
        return await asyncio.wrap_future(future)

    def waiting(self, priority: Priority) -> bool:
        """Whether a request of ``priority`` or a more urgent one is waiting its turn."""
        with self._queue.mutex:
            return any(p <= priority and not f.cancelled() for p, _, _, f in self._queue.queue)

    def _serve(self) -> None:
        while True:
            _, _, work, future = self._queue.get()
            if work is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller left while it waited
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)

    def close(self) -> None:
        self._queue.put((Priority.CLOSE, next(self._order), None, Future()))
        self._thread.join()
