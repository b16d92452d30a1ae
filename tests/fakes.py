"""Scripted stand-ins for the models and stages, on any clock: a ``VirtualClock`` in the
session's tests, the real one behind the web transports (``web_fakes``).

``FakeStages`` is what a ``Session`` asks ``voice.engine.Engine`` for: the real relay over
scripted models, a voice that turns each word into ``WORD_S`` of audio, and recognition and
end of turn that only keep what they are given (tests route their events in, or subclasses
script them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np

from llm.backend import BackendError, Message, Token
from llm.relay import Draft, Relay
from voice.clock import Clock
from voice.events import (
    AudioDone,
    AudioFrame,
    AudioOut,
    DraftReady,
    Event,
    ResponseDone,
    ResponseTextDelta,
    Word,
)
from voice.session import Listener, Observer, TurnTaker, Voice
from voice.settings import LlmSettings, RelayMode

FAST_REPLY = ["Sure", ",", " fast", " reply", "."]
REPLY = [" love", " football", " because", " it", " is", " fun", "."]
WORD_S = 0.1
SYNTH_S = 0.03


def tok(text: str) -> Token:
    return Token(text=text, logprob=-0.1, entropy=0.5, margin=2.0)


class ScriptedModel:
    """Streams scripted pieces, one every ``step`` seconds on the clock."""

    def __init__(
        self, clock: Clock, pieces: list[str], step: float = 0.04, fail_at: int | None = None
    ) -> None:
        self.clock, self.pieces, self.step, self.fail_at = clock, pieces, step, fail_at
        self.calls: list[tuple[list[Message], str]] = []
        self.prefills = 0
        self.prefilled: list[str] = []  # each pre-fill's last message
        # and its second argument: a drafter's transcript, a continuer's opening
        self.prefill_texts: list[str] = []
        self.prefill_s = 0.0  # how long one pre-fill takes on the clock
        self.prefill_fails = False
        self.drafts: list[str] = []

    async def prefill(self, messages: Sequence[Message], text: str = "") -> None:
        self.prefills += 1
        self.prefilled.append(messages[-1].content)
        self.prefill_texts.append(text)
        if self.prefill_s:
            await self.clock.sleep(self.prefill_s)
        if self.prefill_fails:
            raise BackendError("out of memory")

    async def stream(
        self, messages: Sequence[Message], assistant_prefix: str = "", max_tokens: int = 64
    ) -> AsyncIterator[Token]:
        self.calls.append((list(messages), assistant_prefix))
        for i, piece in enumerate(self.pieces):
            await self.clock.sleep(self.step)
            if i == self.fail_at:
                raise BackendError("server went away")
            yield tok(piece)

    async def draft(self, history: Sequence[Message], transcript: str) -> Draft:
        self.drafts.append(transcript)
        await self.clock.sleep(0.1)
        return Draft(transcript=transcript, text="Yes, I love", tokens=(tok("Yes"),))


class Verdict:
    def __init__(self, accept: bool) -> None:
        self.value = accept

    async def read(self, history: Sequence[Message], transcript: str) -> None:
        pass

    async def accept(self, history: Sequence[Message], draft: Draft) -> bool:
        return self.value


class FakeAsr:
    """Keeps the frames it is given and says nothing."""

    def __init__(self) -> None:
        self.frames: list[AudioFrame] = []

    async def push(self, frame: AudioFrame) -> None:
        self.frames.append(frame)

    async def close(self) -> None:
        pass


class FakeTurn:
    """Keeps the events it is given and never ends a turn itself."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.last_assistant: str | None = None

    def push_audio(self, samples: np.ndarray) -> None:
        pass

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    async def close(self) -> None:
        pass


class FakeVoice:
    """Each text delta becomes one chunk, ``word_s`` per word, ``SYNTH_S`` after it arrives, in
    order. The chunk is a constant ``level``, or a ``tone_hz`` tone of that amplitude;
    punctuation alone is not spoken unless ``punctuation``."""

    def __init__(
        self,
        clock: Clock,
        emit: Observer,
        rate: int,
        *,
        word_s: float = WORD_S,
        level: float = 0.2,
        tone_hz: float | None = None,
        punctuation: bool = False,
    ) -> None:
        self.clock, self.emit, self.rate = clock, emit, rate
        self.word_s, self.level, self.tone_hz = word_s, level, tone_hz
        self.punctuation = punctuation
        self.cancelled: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.presynthesised: list[str] = []  # drafts spoken ahead of the end of the turn

    def on_event(self, event: Event) -> None:
        if isinstance(event, ResponseTextDelta | ResponseDone):
            self.tasks.append(asyncio.create_task(self._speak(event, self.tasks[-1:])))
        elif isinstance(event, DraftReady):
            self.presynthesised.append(event.text)

    async def _speak(
        self, event: ResponseTextDelta | ResponseDone, before: list[asyncio.Task[None]]
    ) -> None:
        await asyncio.gather(*before, return_exceptions=True)  # in order
        await self.clock.sleep(SYNTH_S)
        if event.turn_id in self.cancelled:
            return
        if isinstance(event, ResponseDone):
            self.emit(AudioDone(t=self.clock.now(), turn_id=event.turn_id))
            return
        words = [w for w in event.text.split() if self.punctuation or any(map(str.isalnum, w))]
        if not words:
            return
        timed = tuple(
            Word(text=w, start=i * self.word_s, end=(i + 1) * self.word_s)
            for i, w in enumerate(words)
        )
        self.emit(
            AudioOut(
                t=self.clock.now(),
                turn_id=event.turn_id,
                samples=self._signal(round(len(words) * self.word_s * self.rate)),
                sample_rate=self.rate,
                text=event.text,
                words=timed,
            )
        )

    def _signal(self, n: int) -> np.ndarray:
        if self.tone_hz is None:
            return np.full(n, self.level, dtype=np.float32)
        t = np.arange(n) / self.rate
        return (self.level * np.sin(2 * np.pi * self.tone_hz * t)).astype(np.float32)

    def cancel(self, turn_id: int) -> None:
        if turn_id not in self.cancelled:
            self.cancelled.add(turn_id)
            self.emit(AudioDone(t=self.clock.now(), turn_id=turn_id, cancelled=True))

    async def close(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FakeStages:
    """One conversation's stages. The relay's fast model drafts "Yes, I love" (the verifier
    takes it if ``accept``) and says ``FAST_REPLY`` in fast mode; the slow model says ``reply``,
    a piece every ``step`` seconds."""

    def __init__(
        self, clock: Clock, reply: list[str] = REPLY, step: float = 0.02, accept: bool = True
    ) -> None:
        self.fast = ScriptedModel(clock, FAST_REPLY)
        self.slow = ScriptedModel(clock, reply, step=step)
        self.accept = accept
        self.fake_voice: FakeVoice | None = None

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> Listener:
        return FakeAsr()

    def turn(self, clock: Clock, emit: Observer, input_rate: int) -> TurnTaker:
        return FakeTurn()

    def relay(self, clock: Clock, emit: Observer, mode: RelayMode) -> Relay:
        settings = LlmSettings(mode=mode)
        return Relay(settings, self.fast, Verdict(self.accept), self.slow, clock, emit)

    def voice(self, clock: Clock, emit: Observer, output_rate: int) -> Voice:
        self.fake_voice = FakeVoice(clock, emit, output_rate)
        return self.fake_voice
