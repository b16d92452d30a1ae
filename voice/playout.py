"""The assistant's audio on its way out: a queue that the transport (or a pacer) reads from.

The session writes TTS chunks in; whoever plays them (a WebRTC track, a websocket, a WAV
writer paced in real time) calls ``read`` for each frame it sends. Reading is what "heard"
means: the first sample of a reply read is its onset, a frame read while the reply's audio is
late is a gap, and the words whose audio was read are what the user heard when they interrupt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from voice.clock import Clock
from voice.events import AudioOut


@dataclass
class PlayoutTurn:
    """One reply's audio as the listener receives it (clock times, seconds)."""

    turn_id: int
    first_audio_at: float | None = None
    chunk_started_at: list[float] = field(default_factory=list)  # per chunk, in queue order
    gap_s: float = 0.0  # silence read between the reply's first and last sample
    finished_at: float | None = None  # its last sample read (None: interrupted or still going)
    stopped_at: float | None = None  # playback stopped by the user
    produced_all: bool = False  # the voice has sent every chunk
    heard: list[str] = field(default_factory=list)  # words fully played


class Playout:
    def __init__(
        self, sample_rate: int, clock: Clock, on_finish: Callable[[PlayoutTurn], None]
    ) -> None:
        self.sample_rate = sample_rate
        self._clock = clock
        self._on_finish = on_finish
        self._chunks: deque[tuple[AudioOut, int]] = deque()  # chunk, samples already read
        self._turn: PlayoutTurn | None = None
        self.paused = False

    @property
    def turn(self) -> PlayoutTurn | None:
        """The reply now being played (or waiting for its audio)."""
        return self._turn

    @property
    def speaking(self) -> bool:
        """A reply is under way: audio queued or still coming."""
        return self._turn is not None

    def start(self, turn_id: int) -> None:
        """A reply begins (its audio may not exist yet); a previous one is dropped."""
        if self._turn is not None and self._turn.turn_id != turn_id:
            self.stop()
        if self._turn is None:
            self._turn = PlayoutTurn(turn_id)

    def enqueue(self, chunk: AudioOut) -> None:
        if chunk.sample_rate != self.sample_rate:
            raise ValueError(f"chunk at {chunk.sample_rate} Hz; playout is {self.sample_rate} Hz")
        self.start(chunk.turn_id)
        self._chunks.append((chunk, 0))

    def produced_all(self, turn_id: int) -> None:
        """The voice has sent every chunk of ``turn_id``: an empty queue now means the end."""
        if self._turn is not None and self._turn.turn_id == turn_id:
            self._turn.produced_all = True
            if not self._chunks:
                self._finish()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> PlayoutTurn | None:
        """Drop the reply at once (the user barged in); return what was played of it."""
        turn, self._turn = self._turn, None
        self._chunks.clear()
        self.paused = False
        if turn is not None:
            turn.stopped_at = self._clock.now()
            self._on_finish(turn)
        return turn

    @property
    def queued_seconds(self) -> float:
        """Audio waiting to be read."""
        return sum(len(c.samples) - read for c, read in self._chunks) / self.sample_rate

    def heard_text(self) -> str:
        return " ".join(self._turn.heard) if self._turn else ""

    def played_text(self) -> str:
        """The words whose audio has begun to play: all an echo of this reply can hold."""
        if self._turn is None:
            return ""
        started = [c.text for c, read in self._chunks if read > 0]
        return " ".join([*self._turn.heard, *started])

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` samples to play: reply audio, or silence when there is none."""
        out = np.zeros(count, dtype=np.float32)
        turn = self._turn
        if turn is None or self.paused:
            return out
        now, filled = self._clock.now(), 0
        while filled < count and self._chunks:
            chunk, offset = self._chunks[0]
            if offset == 0:
                turn.chunk_started_at.append(now + filled / self.sample_rate)
                if turn.first_audio_at is None:
                    turn.first_audio_at = now + filled / self.sample_rate
            take = min(count - filled, len(chunk.samples) - offset)
            out[filled : filled + take] = chunk.samples[offset : offset + take]
            self._mark_heard(chunk, offset, offset + take)
            filled += take
            if offset + take == len(chunk.samples):
                self._chunks.popleft()
            else:
                self._chunks[0] = (chunk, offset + take)
        if filled < count and turn.first_audio_at is not None:
            if turn.produced_all and not self._chunks:
                self._finish(now + filled / self.sample_rate)
            else:  # the reply has begun and its next audio is late: the listener hears a gap
                turn.gap_s += (count - filled) / self.sample_rate
        return out

    def _mark_heard(self, chunk: AudioOut, start: int, end: int) -> None:
        """Words whose audio has now been read in full count as heard."""
        assert self._turn is not None
        begin, finish = start / chunk.sample_rate, end / chunk.sample_rate
        last = end == len(chunk.samples)  # word times may overshoot the chunk by a rounding
        words = chunk.words or ()
        for word in words:
            if (word.end > begin or start == 0) and (word.end <= finish or last):
                self._turn.heard.append(word.text)
        if not words and end == len(chunk.samples) and chunk.text.strip():
            self._turn.heard += chunk.text.split()

    async def run(self, sink: Callable[[np.ndarray], None], frame_s: float = 0.02) -> None:
        """Play in real time on the clock: hand ``sink`` one frame every ``frame_s`` (what a
        sound card or a WebRTC track does), until cancelled."""
        count = round(frame_s * self.sample_rate)
        deadline = self._clock.now()
        while True:
            sink(self.read(count))
            deadline += frame_s
            await self._clock.sleep_until(deadline)

    def _finish(self, at: float | None = None) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        turn.finished_at = self._clock.now() if at is None else at
        self._on_finish(turn)
