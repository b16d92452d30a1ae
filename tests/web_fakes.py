"""A real ``Session`` on the real clock with scripted stages, served over real sockets: the web
transports' tests exercise every byte on the wire without loading a model.

A tone is speech: each tone is one speech segment whose words are ``SENTENCE`` (one more word
committed per 0.1 s of tone), and the turn ends ``TURN_GAP_S`` after its final transcript. The
relay is the real one over scripted models; the voice turns each word into ``WORD_S`` of a
constant, audible signal (``fakes.FakeStages``). ``FakeEngine`` builds sessions on other stages
too, and ``serving`` serves any engine, the real one included.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from aiohttp import web
from fakes import REPLY, FakeStages

from voice.audio import AudioFormatError, float32_to_pcm16
from voice.clock import Clock, RealClock
from voice.engine import Engine
from voice.events import (
    AudioFrame,
    Event,
    SpeechEnded,
    SpeechStarted,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
)
from voice.session import Observer, Session, TurnRecord
from voice.settings import RelayMode, Settings
from voice.transcripts import TranscriptStore
from web.hub import Hub
from web.server import create_app

SENTENCE = "do you like football"
TURN_GAP_S = 0.1
WINDOW_S = 0.02
LOUD = 0.05


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


class ToneStages(FakeStages):
    """A tone is speech (``ToneAsr``) and a pause ends the turn (``GapTurn``)."""

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> ToneAsr:
        return ToneAsr(emit, clock, input_rate)

    def turn(self, clock: Clock, emit: Observer, input_rate: int) -> GapTurn:
        return GapTurn(emit, clock)


class FakeEngine:
    """``Engine`` as the hub and ``serve`` use it: settings, and a new session per conversation
    on ``stages`` (built with the session's clock and ``reply``)."""

    def __init__(
        self,
        settings: Settings | None = None,
        reply: list[str] = REPLY,
        stages: Callable[[Clock, list[str]], FakeStages] = ToneStages,
    ) -> None:
        self.settings = settings or Settings()
        self.reply = reply
        self.stages = stages
        self.sessions: list[Session] = []
        self.closed = False
        self.prompt_cache_bytes = 0

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
            self.stages(clock, self.reply),
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

    async def warm(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    hub: Hub
    engine: FakeEngine | Engine

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")


@asynccontextmanager
async def serving(
    engine: FakeEngine | Engine | None = None,
    store: TranscriptStore | None = None,
    **options: object,
) -> AsyncIterator[Served]:
    """The app on 127.0.0.1 on a free port, for the duration of the block."""
    engine = engine or FakeEngine()
    hub = Hub(engine, RealClock(), store)  # type: ignore[arg-type]
    runner = web.AppRunner(create_app(hub, engine.settings, **options))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Served(f"http://{host}:{port}", hub, engine)
    finally:
        await runner.cleanup()
