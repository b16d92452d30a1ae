"""A real ``Session`` on the real clock with scripted stages, served over real sockets: the web
transports' tests exercise every byte on the wire without loading a model.

A tone is speech: each tone is one speech segment whose words are ``SENTENCE`` (one more word
committed per 0.1 s of tone), and the turn ends ``TURN_GAP_S`` after its final transcript. The
relay is the real one over scripted models; the voice turns each word into ``WORD_S`` of a
constant, audible signal.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from aiohttp import web
from fakes import ScriptedModel, Verdict

from llm.relay import Relay
from voice.audio import AudioFormatError, float32_to_pcm16
from voice.clock import Clock, RealClock
from voice.events import (
    AudioDone,
    AudioFrame,
    AudioOut,
    Event,
    ResponseDone,
    ResponseTextDelta,
    SpeechEnded,
    SpeechStarted,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
    Word,
)
from voice.session import Observer, Session, TurnRecord
from voice.settings import LlmSettings, RelayMode, Settings
from web.hub import Hub
from web.server import create_app

SENTENCE = "do you like football"
WORD_S = 0.1
TURN_GAP_S = 0.1
WINDOW_S = 0.02
LOUD = 0.05
REPLY = [" love", " football", " because", " it", " is", " fun", "."]


def speech(rate: int, tone_s: float = 0.5, silence_s: float = 0.3) -> np.ndarray:
    t = np.arange(round(tone_s * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.concatenate([tone, np.zeros(round(silence_s * rate))]).astype(np.float32)


def pcm(samples: np.ndarray) -> bytes:
    return float32_to_pcm16(samples)


def b64(samples: np.ndarray) -> str:
    return base64.b64encode(pcm(samples)).decode()


class ToneAsr:
    """Speech is any 20 ms window louder than ``LOUD``; a segment ends after 0.1 s of quiet."""

    def __init__(self, emit: Observer, clock: Clock, rate: int) -> None:
        self.emit, self.clock, self.rate = emit, clock, rate
        self.stream_s = 0.0
        self.speech_s = 0.0
        self.quiet_s = 0.0
        self.speaking = False

    async def push(self, frame: AudioFrame) -> None:
        if len(frame.samples) == 0 or frame.sample_rate != self.rate:
            raise AudioFormatError(f"bad frame: {len(frame.samples)} at {frame.sample_rate} Hz")
        step = round(WINDOW_S * self.rate)
        for i in range(0, len(frame.samples), step):
            self._window(frame.samples[i : i + step])

    def _window(self, window: np.ndarray) -> None:
        at, now = self.stream_s, self.clock.now()
        self.stream_s += len(window) / self.rate
        words = SENTENCE.split()
        if np.abs(window).max() > LOUD:
            self.quiet_s = 0.0
            if not self.speaking:
                self.speaking, self.speech_s = True, 0.0
                self.emit(SpeechStarted(t=now, audio_time=at))
            heard = int(self.speech_s / 0.1)
            self.speech_s += len(window) / self.rate
            if int(self.speech_s / 0.1) > heard and heard < len(words):
                committed = " ".join(words[: heard + 1])
                self.emit(TranscriptPartial(t=now, committed=committed, tentative=""))
        elif self.speaking:
            self.quiet_s += len(window) / self.rate
            if self.quiet_s >= 0.1:
                self.speaking = False
                self.emit(SpeechEnded(t=now, audio_time=at))
                self.emit(TranscriptFinal(t=now, text=SENTENCE))

    async def close(self) -> None:
        pass


class GapTurn:
    """The turn ends ``TURN_GAP_S`` after a final transcript unless speech resumes first."""

    def __init__(self, emit: Observer, clock: Clock) -> None:
        self.emit, self.clock = emit, clock
        self.last_assistant: str | None = None
        self.finals: list[str] = []
        self.timer: asyncio.Task[None] | None = None

    def push_audio(self, samples: np.ndarray) -> None:
        pass

    def on_event(self, event: Event) -> None:
        if isinstance(event, SpeechStarted) and self.timer is not None:
            self.timer.cancel()
        elif isinstance(event, TranscriptFinal):
            self.finals.append(event.text)
            self.timer = asyncio.create_task(self._end())

    async def _end(self) -> None:
        await self.clock.sleep(TURN_GAP_S)
        transcript, self.finals = " ".join(self.finals), []
        self.emit(TurnEnded(t=self.clock.now(), transcript=transcript, reason="test"))
        self.emit(TurnTranscript(t=self.clock.now(), transcript=transcript))

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            await asyncio.gather(self.timer, return_exceptions=True)


class ConstantVoice:
    """Each text delta becomes one chunk of ``WORD_S`` per word, 30 ms after it arrives
    (punctuation alone is not spoken)."""

    def __init__(self, emit: Observer, clock: Clock, rate: int) -> None:
        self.emit, self.clock, self.rate = emit, clock, rate
        self.cancelled: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def on_event(self, event: Event) -> None:
        if isinstance(event, ResponseTextDelta | ResponseDone):
            self.tasks.append(asyncio.create_task(self._speak(event, self.tasks[-1:])))

    async def _speak(
        self, event: ResponseTextDelta | ResponseDone, before: list[asyncio.Task[None]]
    ) -> None:
        await asyncio.gather(*before, return_exceptions=True)  # in order
        await self.clock.sleep(0.03)
        if event.turn_id in self.cancelled:
            return
        if isinstance(event, ResponseDone):
            self.emit(AudioDone(t=self.clock.now(), turn_id=event.turn_id))
            return
        words = [w for w in event.text.split() if any(c.isalnum() for c in w)]
        if not words:
            return
        timed = tuple(
            Word(text=w, start=i * WORD_S, end=(i + 1) * WORD_S) for i, w in enumerate(words)
        )
        samples = np.full(round(len(words) * WORD_S * self.rate), 0.2, dtype=np.float32)
        self.emit(
            AudioOut(
                t=self.clock.now(),
                turn_id=event.turn_id,
                samples=samples,
                sample_rate=self.rate,
                text=event.text,
                words=timed,
            )
        )

    def cancel(self, turn_id: int) -> None:
        if turn_id not in self.cancelled:
            self.cancelled.add(turn_id)
            self.emit(AudioDone(t=self.clock.now(), turn_id=turn_id, cancelled=True))

    async def close(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FakeStages:
    def __init__(self, clock: Clock, reply: list[str]) -> None:
        self.clock, self.reply = clock, reply

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> ToneAsr:
        return ToneAsr(emit, clock, input_rate)

    def turn(self, clock: Clock, emit: Observer, input_rate: int) -> GapTurn:
        return GapTurn(emit, clock)

    def relay(self, clock: Clock, emit: Observer, mode: RelayMode) -> Relay:
        fast = ScriptedModel(clock, ["Sure", ",", " fast", " reply", "."])  # type: ignore[arg-type]
        slow = ScriptedModel(clock, self.reply, step=0.02)  # type: ignore[arg-type]
        return Relay(LlmSettings(mode=mode), fast, Verdict(True), slow, clock, emit)

    def voice(self, clock: Clock, emit: Observer, output_rate: int) -> ConstantVoice:
        return ConstantVoice(emit, clock, output_rate)


class FakeEngine:
    """``Engine`` as the hub uses it: settings, and a new session per conversation."""

    def __init__(self, settings: Settings | None = None, reply: list[str] = REPLY) -> None:
        self.settings = settings or Settings()
        self.reply = reply
        self.sessions: list[Session] = []
        self.closed = False

    def session(
        self,
        clock: Clock,
        input_rate: int = 16000,
        output_rate: int | None = None,
        mode: RelayMode | None = None,
        observer: Observer | None = None,
        on_record: Callable[[TurnRecord], None] | None = None,
    ) -> Session:
        session = Session(
            FakeStages(clock, self.reply),  # type: ignore[arg-type]
            self.settings.session,
            clock,
            mode or self.settings.llm.mode,
            input_rate,
            output_rate or self.settings.session.output_rate,
            observer,
            on_record,
        )
        self.sessions.append(session)
        return session

    def close(self) -> None:
        self.closed = True


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    hub: Hub
    engine: FakeEngine

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")


@asynccontextmanager
async def serving(engine: FakeEngine | None = None, **options: object) -> AsyncIterator[Served]:
    """The app on 127.0.0.1 on a free port, for the duration of the block."""
    engine = engine or FakeEngine()
    hub = Hub(engine, RealClock())  # type: ignore[arg-type]
    runner = web.AppRunner(create_app(hub, engine.settings, **options))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Served(f"http://{host}:{port}", hub, engine)
    finally:
        await runner.cleanup()
