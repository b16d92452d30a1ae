"""Real-time replay: hand a recording to a pipeline the way a microphone would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from voice.clock import Clock
from voice.events import AudioFrame

FRAME_S = 0.02


async def stream(
    clock: Clock,
    start: float,
    audio: np.ndarray,
    rate: int,
    push: Callable[[AudioFrame], Awaitable[None]],
    paced: bool = True,
) -> None:
    """Push ``audio`` in 20 ms frames, each only once it would have been fully recorded had
    recording begun at clock time ``start``: an event at clock time ``t`` then happened at
    stream second ``t - start``."""
    step = int(FRAME_S * rate)
    for i in range(0, len(audio), step):
        if paced:
            await clock.sleep_until(start + (i + step) / rate)
        await push(AudioFrame(t=clock.now(), samples=audio[i : i + step], sample_rate=rate))
