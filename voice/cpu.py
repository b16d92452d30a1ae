"""Two cores, shared by deadline: what the listener is waiting for goes first.

Recognising the user's last words, judging the end of their turn and synthesising the next
audio are short jobs with someone waiting on them; the slow model's token loop is long and can
wait a few tens of milliseconds. Urgent jobs run inside ``CpuGate.urgent()``; the slow model
calls ``CpuGate.wait_clear()`` between tokens and so steps aside while any urgent job runs
(measured on the 2-core target: Piper took 380 ms to voice a 1.3 s prefix beside the slow
model's two threads; MODELS.md measured its first audio at 21-45 ms alone).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from threadpoolctl import threadpool_limits

P = ParamSpec("P")
R = TypeVar("R")

MAX_YIELD_S = 1.0  # background work never waits longer than this for one urgent job


def single_thread_blas() -> None:
    """numpy's BLAS (OpenBLAS) otherwise starts a thread per core that spins after each small
    matrix product (mel filters, features) and takes the other core from whichever model runs
    there: measured inside `eval turn --quick`, smart-turn's ONNX run took a median 70 ms with
    two BLAS threads and 47 ms with one. The models' own thread budgets are in the settings."""
    threadpool_limits(limits=1, user_api="blas")


class CpuGate:
    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._urgent = 0

    @contextmanager
    def urgent(self) -> Iterator[None]:
        with self._idle:
            self._urgent += 1
        try:
            yield
        finally:
            with self._idle:
                self._urgent -= 1
                if not self._urgent:
                    self._idle.notify_all()

    @property
    def busy(self) -> bool:
        """Whether urgent work is running."""
        with self._idle:
            return self._urgent > 0

    def wrap(self, job: Callable[P, R]) -> Callable[P, R]:
        """``job`` run as urgent work."""

        def urgent_job(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.urgent():
                return job(*args, **kwargs)

        return urgent_job

    def wait_clear(self) -> None:
        """Background work, between two steps: wait while urgent work runs (bounded)."""
        with self._idle:
            self._idle.wait_for(lambda: self._urgent == 0, MAX_YIELD_S)
