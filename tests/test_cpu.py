"""The CPU gate: background work waits for urgent work, never for long."""

import threading

import numpy as np
from threadpoolctl import threadpool_info

from voice import cpu
from voice.cpu import CpuGate, single_thread_blas


def test_background_work_waits_until_urgent_work_is_done():
    gate, order = CpuGate(), []
    started, release = threading.Event(), threading.Event()

    def urgent():
        with gate.urgent():
            started.set()
            release.wait(5)
            order.append("urgent")

    worker = threading.Thread(target=urgent)
    worker.start()
    started.wait(5)
    waiter = threading.Thread(target=lambda: (gate.wait_clear(), order.append("background")))
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive()  # still waiting
    release.set()
    worker.join(5)
    waiter.join(5)
    assert order == ["urgent", "background"]


def test_an_idle_gate_does_not_wait_and_a_stuck_one_waits_only_so_long(monkeypatch):
    gate = CpuGate()
    gate.wait_clear()  # returns at once
    monkeypatch.setattr(cpu, "MAX_YIELD_S", 0.05)
    with gate.urgent():
        t = threading.Thread(target=gate.wait_clear)
        t.start()
        t.join(5)
        assert not t.is_alive()  # gave up waiting though the urgent job goes on


def test_wrap_runs_the_job_as_urgent_work():
    gate = CpuGate()
    seen = []
    job = gate.wrap(lambda x: seen.append(gate._urgent) or x * 2)
    assert job(21) == 42 and seen == [1] and gate._urgent == 0


def test_single_thread_blas_leaves_numpy_one_blas_thread():
    np.ones((8, 8)) @ np.ones((8, 8))  # numpy's BLAS is loaded
    single_thread_blas()
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
