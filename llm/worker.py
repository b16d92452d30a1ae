"""The one thread a model's requests run on, replies before pre-fills.

A llama.cpp context does one thing at a time, and every conversation shares it. A pre-fill
only makes a later reply sooner, while a reply is what a caller is waiting for: so a waiting
reply always goes before a waiting pre-fill (first come, first served within each), and one
conversation reading ahead never holds up another's answer. A request already running is not
interrupted.
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
    REPLY = 0
    READ_AHEAD = 1
    CLOSE = 2  # after everything already queued


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
