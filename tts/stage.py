"""The TTS stage: reply text in, audio chunks out, while the reply is still being written.

Text deltas of each reply are cut into chunks (``tts.text.Chunker``): the relay's prefix at
once as a chunk of its own, the first streamed chunk at its first clause or after a few words,
later ones at natural boundaries. Each chunk is cleaned for speech (markdown, emoji), then
synthesised on one worker thread, in order, so the event loop never waits on a model and
synthesis never takes more than its thread budget. A draft that the verifier accepted before
the turn was even confirmed (``DraftReady``) is synthesised speculatively; when the same text
arrives as the reply's prefix its audio goes out without waiting for the voice.

Events out, per chunk: ``AudioOut`` (resampled to the output rate, with estimated word times)
and ``Metric("tts.synth_ms")``; per reply: ``Metric("tts.first_audio_ms")`` from its first text
delta to its first audio, and exactly one ``AudioDone`` once every chunk is out or the reply
is cancelled. A chunk the voice fails on is reported as a ``StageError`` and skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from tts.text import Chunker, speakable
from tts.timing import Voicing, voicing, word_times
from tts.voices import Voice, load_voice
from voice.audio import check_rate, resample, validate_samples
from voice.clock import Clock
from voice.cpu import CpuGate
from voice.events import (
    AudioDone,
    AudioOut,
    DraftReady,
    Event,
    Metric,
    ResponseDone,
    ResponseTextDelta,
    StageError,
)
from voice.settings import Settings, TtsSettings

Emit = Callable[[Event], None]

_DRAFTS_KEPT = 2  # speculative drafts held at once: the current one and the one before


@dataclass(frozen=True)
class _Speech:
    """One chunk as synthesised, at the stage's output rate."""

    samples: np.ndarray
    voiced: Voicing  # where it is voiced, to time its words
    synth_ms: float


@dataclass(frozen=True)
class _Synthesis:
    """One chunk on the worker: the executor's future, and the event loop's view of it."""

    work: Future[_Speech]
    speech: asyncio.Future[_Speech]

    def cancel(self) -> None:
        # The executor's future first, at once: cancelling only the loop's view reaches it a
        # loop pass later, by when the worker may have started it.
        self.work.cancel()
        self.speech.cancel()


@dataclass
class _Turn:
    id: int
    chunker: Chunker
    started_at: float  # clock time its first text arrived
    jobs: list[_Synthesis] = field(default_factory=list)  # its own (not drafts)
    done: bool = False  # ResponseDone came: later text is ignored
    cancelled: bool = False
    heard: bool = False  # its first AudioOut went out


@dataclass(frozen=True)
class _Chunk:
    turn: _Turn
    text: str  # as the reply wrote it
    synthesis: _Synthesis
    from_draft: bool


@dataclass(frozen=True)
class _End:
    turn: _Turn


class TtsStage:
    """One conversation's synthesis. Synthesis runs on ``executor`` (one worker, so chunks
    are made in order) or, when none is given, on a thread of the stage's own."""

    def __init__(
        self,
        voice: Voice,
        settings: TtsSettings,
        clock: Clock,
        emit: Emit,
        output_rate: int,
        executor: Executor | None = None,
        gate: CpuGate | None = None,
    ) -> None:
        check_rate(voice.sample_rate)  # a voice at a rate nobody can resample fails here, once
        self._voice = voice
        self._gate = gate  # synthesis is urgent work: the listener is waiting for it
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._rate = check_rate(output_rate)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
        self._turns: dict[int, _Turn] = {}
        self._finished: set[int] = set()  # turns whose AudioDone went out
        self._drafts: OrderedDict[str, _Synthesis] = OrderedDict()
        self._queue: asyncio.Queue[_Chunk | _End] = asyncio.Queue()
        self._delivery: asyncio.Task[None] | None = None

    def on_event(self, event: Event) -> None:
        """Take reply text and drafts; every other event is ignored."""
        if isinstance(event, ResponseTextDelta):
            self._on_text(event)
        elif isinstance(event, ResponseDone):
            if event.cancelled:  # the reply was cut short: so is its audio
                self.cancel(event.turn_id)
            else:
                self._on_done(event)
        elif isinstance(event, DraftReady):
            self._on_draft(event)

    def cancel(self, turn_id: int) -> None:
        """Stop a reply's audio now: its queued text and chunks are dropped, a synthesis in
        flight finishes but is thrown away, and ``AudioDone(cancelled=True)`` goes out unless
        its AudioDone already did. Later text for the turn is ignored."""
        if turn_id in self._finished:
            return
        turn = self._turns.pop(turn_id, None)
        if turn is not None:
            turn.cancelled = True
            for job in turn.jobs:
                job.cancel()  # not started: never runs; running: its result is dropped
        self._finished.add(turn_id)
        self._emit(AudioDone(t=self._clock.now(), turn_id=turn_id, cancelled=True))

    async def flush(self) -> None:
        """Until every chunk queued so far is out (for tests and offline evaluation). An error
        that ``emit`` raised surfaces here rather than leaving the queue stuck."""
        if self._delivery is None:
            return
        joined = asyncio.ensure_future(self._queue.join())
        await asyncio.wait([joined, self._delivery], return_when=asyncio.FIRST_COMPLETED)
        joined.cancel()
        if self._delivery.done():  # it only ends by failing (or when closed)
            self._delivery.result()

    async def close(self) -> None:
        await self.flush()
        if self._delivery is not None:
            self._delivery.cancel()
            await asyncio.gather(self._delivery, return_exceptions=True)
        for draft in self._drafts.values():
            draft.cancel()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    def _turn(self, turn_id: int) -> _Turn | None:
        """The reply still taking text, or None when it is over or cancelled."""
        if turn_id in self._finished:
            return None
        turn = self._turns.get(turn_id)
        if turn is None:
            s = self._settings
            chunker = Chunker(s.first_chunk_words, s.chunk_min_words, s.chunk_max_words)
            turn = self._turns[turn_id] = _Turn(turn_id, chunker, self._clock.now())
        return None if turn.done else turn

    def _on_text(self, event: ResponseTextDelta) -> None:
        turn = self._turn(event.turn_id)
        if turn is None:
            return
        if event.source == "prefix":
            for text in turn.chunker.phrase(event.text):
                self._say(turn, text, draft=self._drafts.pop(speakable(text), None))
        else:
            for text in turn.chunker.push(event.text):
                self._say(turn, text)

    def _on_done(self, event: ResponseDone) -> None:
        turn = self._turn(event.turn_id)
        if turn is None:
            return
        for text in turn.chunker.flush():
            self._say(turn, text)
        turn.done = True
        self._put(_End(turn))

    def _on_draft(self, event: DraftReady) -> None:
        spoken = speakable(event.text)
        if not spoken:
            return
        if spoken in self._drafts:
            self._drafts.move_to_end(spoken)
            return
        self._drafts[spoken] = self._synthesize(spoken)
        while len(self._drafts) > _DRAFTS_KEPT:
            self._drafts.popitem(last=False)[1].cancel()

    def _say(self, turn: _Turn, text: str, draft: _Synthesis | None = None) -> None:
        """Queue one chunk: its speech is the draft's when one was made, else synthesised."""
        spoken = speakable(text)
        if not spoken:
            return
        synthesis = draft
        if synthesis is None:
            synthesis = self._synthesize(spoken)
            turn.jobs.append(synthesis)
        self._put(_Chunk(turn, text, synthesis, from_draft=draft is not None))

    def _synthesize(self, spoken: str) -> _Synthesis:
        work = self._executor.submit(self._render, spoken)
        speech = asyncio.wrap_future(work)
        speech.add_done_callback(_consume)
        return _Synthesis(work, speech)

    def _render(self, spoken: str) -> _Speech:
        """On the worker thread: the voice, resampling, and where the audio is voiced."""
        started = time.perf_counter()
        with self._gate.urgent() if self._gate else nullcontext():
            audio = validate_samples(self._voice.synthesize(spoken))
        # Resampling a signal peaking at full scale overshoots it slightly (ringing).
        samples = np.clip(resample(audio, self._voice.sample_rate, self._rate), -1.0, 1.0)
        voiced = voicing(samples, self._rate)
        return _Speech(samples, voiced, (time.perf_counter() - started) * 1000)

    def _put(self, item: _Chunk | _End) -> None:
        if self._delivery is None:
            self._delivery = asyncio.create_task(self._deliver_all())
        self._queue.put_nowait(item)

    async def _deliver_all(self) -> None:
        """Emit queued chunks strictly in order, each once its speech is ready."""
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, _End):
                    self._end(item.turn)
                elif not item.turn.cancelled:
                    await asyncio.wait([item.synthesis.speech])  # no raise when cancelled
                    self._deliver(item)
            finally:
                self._queue.task_done()

    def _deliver(self, chunk: _Chunk) -> None:
        turn, now = chunk.turn, self._clock.now()
        if turn.cancelled:  # while its speech was being made
            return
        error = chunk.synthesis.speech.exception()
        if error is not None:
            opening = " ".join(chunk.text.split()[:6])
            message = f"could not synthesise {opening!r}: {type(error).__name__}: {error}"
            self._emit(StageError(t=now, stage="tts", message=message, reply_failed=True))
            return
        speech = chunk.synthesis.speech.result()
        if speech.samples.size == 0:
            return
        self._emit(
            AudioOut(
                t=now,
                turn_id=turn.id,
                samples=speech.samples,
                sample_rate=self._rate,
                text=chunk.text,
                words=word_times(chunk.text, speech.voiced),
            )
        )
        labels = {"cache": "draft"} if chunk.from_draft else {}
        self._emit(
            Metric(
                t=now, name="tts.synth_ms", value=speech.synth_ms, turn_id=turn.id, labels=labels
            )
        )
        if not turn.heard:
            turn.heard = True
            elapsed = (now - turn.started_at) * 1000
            self._emit(Metric(t=now, name="tts.first_audio_ms", value=elapsed, turn_id=turn.id))

    def _end(self, turn: _Turn) -> None:
        if turn.cancelled:  # its AudioDone went out at the cancel
            return
        self._turns.pop(turn.id, None)
        self._finished.add(turn.id)
        self._emit(AudioDone(t=self._clock.now(), turn_id=turn.id))


def _consume(future: asyncio.Future[_Speech]) -> None:
    """Mark a failure as seen: the delivery loop reports it, or the chunk was dropped."""
    if not future.cancelled():
        future.exception()


class TtsModels:
    """The chosen voice, loaded once and shared by every conversation. Its stages share one
    worker thread, so synthesis never takes more than ``tts.threads`` cores in all."""

    def __init__(self, settings: Settings, gate: CpuGate | None = None) -> None:
        self.settings = settings
        self.voice = load_voice(settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
        self._gate = gate

    def stage(self, clock: Clock, emit: Emit, output_rate: int) -> TtsStage:
        """A fresh stage for one conversation, with audio at ``output_rate``."""
        return TtsStage(
            self.voice, self.settings.tts, clock, emit, output_rate, self._executor, self._gate
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
