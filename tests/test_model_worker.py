"""A shared model's one thread: replies go before pre-fills, and nobody waits for a caller
that left."""

import asyncio
import threading

from llm.worker import ModelWorker, Priority


class Blocker:
    """Work that holds the model's thread until released."""

    def __init__(self, ran: list[str], name: str) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.ran, self.name = ran, name

    def __call__(self) -> str:
        self.started.set()
        self.release.wait(5)
        self.ran.append(self.name)
        return self.name

    async def running(self) -> None:
        await asyncio.to_thread(self.started.wait, 5)


def job(ran: list[str], name: str):
    return lambda: ran.append(name) or name


async def busy_worker(priority: Priority = Priority.REPLY):
    """A worker whose thread is held by a running request (released through the Blocker)."""
    worker, ran = ModelWorker("test"), []
    busy = Blocker(ran, "busy")
    running = asyncio.create_task(worker.run(priority, busy))
    await busy.running()
    return worker, ran, busy, running


async def test_a_waiting_reply_goes_before_pre_fills_that_came_first():
    worker, ran, busy, running = await busy_worker(Priority.READ_AHEAD)
    waiting = [
        asyncio.create_task(worker.run(Priority.READ_AHEAD, job(ran, "pre-fill 1"))),
        asyncio.create_task(worker.run(Priority.READ_AHEAD, job(ran, "pre-fill 2"))),
        asyncio.create_task(worker.run(Priority.REPLY, job(ran, "reply 1"))),
        asyncio.create_task(worker.run(Priority.REPLY, job(ran, "reply 2"))),
    ]
    await asyncio.sleep(0)
    busy.release.set()
    results = await asyncio.gather(running, *waiting)
    assert results == ["busy", "pre-fill 1", "pre-fill 2", "reply 1", "reply 2"]
    assert ran == ["busy", "reply 1", "reply 2", "pre-fill 1", "pre-fill 2"]
    worker.close()


async def test_a_caller_that_leaves_the_queue_is_skipped_and_a_running_one_is_waited_for():
    worker, ran, busy, running = await busy_worker()
    gone = asyncio.create_task(worker.run(Priority.REPLY, job(ran, "gone")))
    after = asyncio.create_task(worker.run(Priority.READ_AHEAD, job(ran, "after")))
    await asyncio.sleep(0)
    gone.cancel()
    running.cancel()  # its work is running: it finishes before anything else starts
    await asyncio.sleep(0.05)  # time for a wrongly started job to run
    assert ran == []
    busy.release.set()
    assert await after == "after"
    assert ran == ["busy", "after"] and gone.cancelled() and running.cancelled()
    worker.close()


def test_work_queued_on_an_event_loop_that_ended_does_not_block_the_next():
    worker, ran = ModelWorker("test"), []

    async def leave_work_running():
        blocker = Blocker(ran, "left behind")
        left = asyncio.create_task(worker.run(Priority.READ_AHEAD, blocker))
        await blocker.running()
        assert not left.done()
        blocker.release.set()  # the loop ends before its result is collected

    asyncio.run(leave_work_running())
    next_one = worker.run(Priority.REPLY, job(ran, "next"))
    assert asyncio.run(asyncio.wait_for(next_one, 10)) == "next"
    worker.close()


async def test_work_can_see_whether_a_more_urgent_request_waits():
    worker, ran, busy, running = await busy_worker()
    assert not worker.waiting(Priority.CONTINUATION)
    ahead = asyncio.create_task(worker.run(Priority.READ_AHEAD, job(ran, "read")))
    await asyncio.sleep(0)
    assert not worker.waiting(Priority.CONTINUATION)  # a pre-fill is no reason to stop
    reply = asyncio.create_task(worker.run(Priority.REPLY, job(ran, "reply")))
    await asyncio.sleep(0)
    assert worker.waiting(Priority.CONTINUATION)
    reply.cancel()
    await asyncio.sleep(0)
    assert not worker.waiting(Priority.CONTINUATION)  # it left
    busy.release.set()
    await asyncio.gather(running, ahead)
    worker.close()
