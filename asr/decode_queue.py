"""One queue for the decodes of every audio stream: finals before partials.

A final transcript is what a turn waits for; a partial only refreshes what is shown. Each
stream used to have worker threads of its own, so with two conversations up to four decodes
asked the model's two replicas at once and a final waited behind the other stream's partials
in CTranslate2's own first-come queue. Here as many threads as the model has replicas take the
most urgent decode first (in order of arrival within a kind), and a decode cancelled while it
waits (a speculative final the user talked over, a partial whose segment has ended) never runs.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from asr.whisper import DecodeRequest, Hypothesis

Decode = Callable[[DecodeRequest], Hypothesis]

FINAL, PARTIAL = 0, 1  # priorities: lower runs first

_Job = tuple[int, int, DecodeRequest | None, Future[Hypothesis] | None]  # None, None: stop


class DecodeQueue:
    def __init__(self, decode: Decode, workers: int) -> None:
        self._decode = decode
        self._jobs: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"asr-decode-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: DecodeRequest, priority: int) -> Future[Hypothesis]:
        future: Future[Hypothesis] = Future()
        self._jobs.put((priority, next(self._order), request, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, request, future = self._jobs.get()
            if request is None or future is None:  # close()
                return
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                future.set_result(self._decode(request))
            except Exception as exc:  # handed to whoever waits on the transcript
                future.set_exception(exc)

    def close(self) -> None:
        """Run what is queued, then stop the threads."""
        for _ in self._threads:
            self._jobs.put((PARTIAL + 1, next(self._order), None, None))
        for thread in self._threads:
            thread.join()
