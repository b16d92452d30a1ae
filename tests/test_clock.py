import asyncio

import pytest

from voice.clock import RealClock, VirtualClock, wait_for


def run(coro):
    return asyncio.run(coro)


def test_virtual_clock_wakes_sleepers_in_deadline_order_at_their_times():
    async def main():
        clock = VirtualClock()
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float):
            await clock.sleep(seconds)
            woke.append((name, clock.now()))

        tasks = [
            asyncio.create_task(sleeper(n, s)) for n, s in [("c", 0.3), ("a", 0.1), ("b", 0.2)]
        ]
        await clock.advance(0.15)
        assert woke == [("a", 0.1)]
        assert clock.now() == pytest.approx(0.15)
        await clock.advance(1.0)
        assert woke == [("a", 0.1), ("b", 0.2), ("c", 0.3)]
        assert clock.now() == pytest.approx(1.15)
        await asyncio.gather(*tasks)

    run(main())


def test_virtual_clock_follows_a_periodic_task_exactly():
    async def main():
        clock = VirtualClock(start=10.0)
        ticks: list[float] = []

        async def ticker():
            deadline = clock.now()
            for _ in range(5):
                deadline += 0.02
                await clock.sleep_until(deadline)
                ticks.append(round(clock.now(), 6))

        task = asyncio.create_task(ticker())
        await clock.advance(0.1)
        await task
        assert ticks == [10.02, 10.04, 10.06, 10.08, 10.1]

    run(main())


def test_sleep_until_the_past_returns_without_advancing():
    async def main():
        clock = VirtualClock(start=5.0)
        await clock.sleep_until(4.0)
        await clock.sleep(0)
        assert clock.now() == 5.0
        assert clock.next_deadline is None

    run(main())


def test_cancelled_sleeper_does_not_block_others():
    async def main():
        clock = VirtualClock()
        early = asyncio.create_task(clock.sleep(0.1))
        late = asyncio.create_task(clock.sleep(0.5))
        await clock.advance(0)
        early.cancel()
        await clock.advance(0.6)
        assert late.done() and not late.cancelled()
        assert early.cancelled()

    run(main())


def test_clock_cannot_go_backwards():
    async def main():
        with pytest.raises(ValueError, match="backwards"):
            await VirtualClock().advance(-1)

    run(main())


def test_real_clock_is_monotonic_and_sleeps():
    async def main():
        clock = RealClock()
        before = clock.now()
        await clock.sleep(0.001)
        await clock.sleep_until(clock.now() - 1)  # a past deadline returns at once
        assert clock.now() >= before

    run(main())


async def test_wait_for_times_out_on_virtual_time_and_cancels_the_work():
    clock = VirtualClock()
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await clock.sleep(10)
            return "late"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def quick() -> str:
        await clock.sleep(1)
        return "done"

    task = asyncio.create_task(wait_for(clock, slow(), 2.0))
    await clock.advance(2.0)
    with pytest.raises(TimeoutError, match="nothing within 2 s"):
        await task
    assert cancelled.is_set()
    task = asyncio.create_task(wait_for(clock, quick(), 2.0))
    await clock.advance(1.0)
    assert await task == "done"
