"""The ASR stage: audio frames in; speech start/end, partial and final transcripts out.

VAD runs inline (a fraction of a millisecond per 32 ms window). Decodes go to the models'
``DecodeQueue``, shared by every stream, so the event loop never blocks: one partial at a time
per stream, and finals ahead of every stream's partials (someone waits on them).
The first quiet window inside speech (its energy fallen far below the segment's loudest, which
Silero only hears ~100 ms later) or the first silent one starts the final decode
speculatively, so that when the VAD confirms the end the transcript is (nearly) ready; if the
user goes on, that result is simply dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from asr.decode_queue import FINAL, PARTIAL, DecodeQueue
from asr.recognizer import PendingFinal, StreamingRecognizer, join_words
from asr.vad import SAMPLE_RATE, SileroVad, VadWindow, VoiceActivityDetector
from asr.whisper import REPLICAS, DecodeRequest, Hypothesis, WhisperDecoder, load_whisper
from voice.audio import AudioFormatError, check_rate, pcm16_to_float32
from voice.clock import Clock
from voice.cpu import CpuGate, single_thread_blas
from voice.events import (
    AudioFrame,
    Event,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptFinal,
    TranscriptPartial,
)
from voice.models import resolve
from voice.settings import Settings, VadSettings

Emit = Callable[[Event], None]

# Silero hears speech for up to ~200 ms after the audio goes quiet (P97 on Asterisk prompts);
# when it hears it longer than this, the quiet audio held soft speech.
_QUIET_TRUST_S = 0.25


@dataclass(frozen=True)
class _Decode:
    request: DecodeRequest
    result: asyncio.Future[Hypothesis]
    job: Future[Hypothesis]  # the queued job: cancelling it skips a decode not yet started


class AsrStage:
    def __init__(
        self,
        vad: VoiceActivityDetector,
        recognizer: StreamingRecognizer,
        decodes: DecodeQueue,
        clock: Clock,
        emit: Emit,
        vad_settings: VadSettings,
    ) -> None:
        self._vad = vad
        self._recognizer = recognizer
        self._decodes = decodes
        self._clock = clock
        self._emit = emit
        self._threshold = vad_settings.threshold
        self._busy: _Decode | None = None  # this stream's partial decode in flight
        self._pause_at: float | None = None
        self._pause_quiet = False  # the pause was guessed from a quiet window, not from Silero
        self._speculation: _Decode | None = None  # the final decode started at the pause
        self._last_final: asyncio.Task[None] | None = None
        self._finals: set[asyncio.Task[None]] = set()
        self._partials: set[asyncio.Task[None]] = set()
        self.decode_ms = 0.0  # total decoder compute, for real-time factor reports

    async def push(self, frame: AudioFrame) -> None:
        """Feed one chunk of user audio (any supported rate; resampled once here)."""
        if len(frame.samples) == 0:
            raise AudioFormatError("empty audio frame")
        expected = self._vad.input_rate
        if check_rate(frame.sample_rate) != expected:
            raise AudioFormatError(f"frame at {frame.sample_rate} Hz; stream is at {expected} Hz")
        for window in self._vad.process(frame.samples):
            self._on_window(window)

    async def push_pcm16(self, data: bytes, sample_rate: int) -> None:
        """Feed little-endian PCM16 mono bytes, as transports receive them."""
        await self.push(
            AudioFrame(t=self._clock.now(), samples=pcm16_to_float32(data), sample_rate=sample_rate)
        )

    def _on_window(self, window: VadWindow) -> None:
        self._recognizer.add(window.samples)
        if window.started:
            self._recognizer.start_segment(window.speech_time)
            self._emit(SpeechStarted(t=self._clock.now(), audio_time=window.speech_time))
        # Still speaking: drop any guess. A guess made on a quiet window, which Silero still
        # heard as speech, goes with any sound at all: quiet words may follow.
        if not window.quiet and (window.probability >= self._threshold or self._pause_quiet):
            self._pause_at = None
            self._drop_speculation()
        if (window.paused or window.quiet) and self._pause_at is None:
            self._pause_at, self._pause_quiet = window.start, not window.paused
        if window.ended:
            self._emit(SpeechEnded(t=self._clock.now(), audio_time=window.speech_time))
            self._finish(window.speech_time)
        else:
            self._schedule()

    def _run(self, request: DecodeRequest, priority: int) -> _Decode:
        job = self._decodes.submit(request, priority)
        result = asyncio.wrap_future(job)
        result.add_done_callback(self._count)
        return _Decode(request, result, job)

    def _drop_speculation(self) -> None:
        """The user went on: the pause's final decode is not needed (if it has not started,
        it never runs)."""
        if self._speculation is not None:
            self._speculation.job.cancel()
            self._speculation = None

    def _count(self, future: asyncio.Future[Hypothesis]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.decode_ms += future.result().compute_ms

    def _release(self, partial: _Decode) -> None:
        if partial is self._busy:
            self._busy = None
            self._schedule()

    def _schedule(self) -> None:
        """Start the next decode: in a pause a speculative final at once (ahead of partials,
        whatever partial is still running), otherwise a partial once this stream's last one
        is back and enough new audio has arrived."""
        if not self._recognizer.active:
            return
        if self._pause_at is not None:
            if self._speculation is None:
                self._speculation = self._run(self._recognizer.final_request(self._pause_at), FINAL)
            return
        if self._busy is not None:
            return
        request = self._recognizer.partial_request()
        if request is not None:
            # The stream's partial counts as done only once its result is applied, so the next
            # request sees the words it committed.
            partial = self._busy = self._run(request, PARTIAL)
            task = asyncio.create_task(self._partial(self._recognizer.segment, partial))
            self._partials.add(task)
            task.add_done_callback(self._partials.discard)

    async def _partial(self, segment: int, partial: _Decode) -> None:
        await asyncio.wait([partial.result])
        if partial.result.cancelled():  # its segment ended before it could start
            self._release(partial)
            return
        try:
            hypothesis = partial.result.result()
        except Exception as exc:  # a failed partial is reported; the final decode still runs
            self._emit(
                StageError(
                    t=self._clock.now(), stage="asr", message=f"partial decode failed: {exc}"
                )
            )
            self._release(partial)
            return
        # A final decode of this audio already runs (a pause): it supersedes this partial,
        # whose newly committed words it would not know about.
        superseded = self._speculation is not None
        result = None if superseded else self._recognizer.apply_partial(segment, hypothesis)
        self._release(partial)
        if result is not None:
            self._emit(
                TranscriptPartial(
                    t=self._clock.now(),
                    committed=join_words(result.committed),
                    tentative=join_words(result.tentative),
                    words=tuple(result.committed + result.tentative),
                )
            )

    def _finish(self, end_time: float) -> None:
        guessed_at = self._pause_at
        if self._pause_quiet and guessed_at is not None and end_time - guessed_at > _QUIET_TRUST_S:
            self._drop_speculation()  # Silero went on hearing speech that quiet: decode it too
        speculation, self._pause_at, self._speculation = self._speculation, None, None
        if self._busy is not None:  # a partial of the closed segment would only be dropped
            self._busy.job.cancel()
        if speculation is not None:  # nothing but quiet or silence came after its audio
            pending = self._recognizer.close(end_time, speculation.request)
            future = speculation.result
        else:
            pending = self._recognizer.close(end_time)
            future = self._run(pending.request, FINAL).result
        task = asyncio.create_task(self._final(pending, future, self._last_final))
        self._last_final = task
        self._finals.add(task)
        task.add_done_callback(self._finals.discard)

    async def _final(
        self,
        pending: PendingFinal,
        future: asyncio.Future[Hypothesis],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Apply a closed segment's final decode once the segment before it is applied: its
        words must be history first (two finals of one stream may decode side by side)."""
        hypothesis = await self._final_hypothesis(future)
        if pending.whole and not hypothesis.words:
            pending = self._recognizer.tail_final(pending)
            hypothesis = await self._final_hypothesis(self._run(pending.request, FINAL).result)
        if previous is not None:
            await asyncio.wait([previous])
        words = self._recognizer.complete(pending, hypothesis)
        self._emit(
            TranscriptFinal(
                t=self._clock.now(),
                text=join_words(words),
                words=tuple(words),
                compute_ms=hypothesis.compute_ms,
            )
        )

    async def _final_hypothesis(self, future: asyncio.Future[Hypothesis]) -> Hypothesis:
        try:
            return await future
        except Exception as exc:  # keep the words already committed rather than lose the turn
            self._emit(
                StageError(t=self._clock.now(), stage="asr", message=f"final decode failed: {exc}")
            )
            return Hypothesis([])

    async def flush(self) -> None:
        """End of input: close an open segment and wait until every transcript is out."""
        if self._recognizer.active:
            end = self._vad.stream_time
            self._emit(SpeechEnded(t=self._clock.now(), audio_time=end))
            self._vad.reset()
            self._finish(end)
        while self._finals or self._partials:
            await asyncio.gather(*self._finals, *self._partials)

    async def close(self) -> None:
        await self.flush()


class AsrModels:
    """The recogniser's models, loaded once and shared by every stream."""

    def __init__(self, settings: Settings, gate: CpuGate | None = None) -> None:
        """``gate``: decodes count as urgent work (someone waits on the transcript)."""
        self.settings = settings
        single_thread_blas()
        self.vad = SileroVad(resolve("vad", settings).path)
        self.whisper = load_whisper(
            resolve(settings.asr.model, settings).path, settings.asr.threads
        )
        self.decoder = WhisperDecoder(self.whisper, settings.asr)
        decode = self.decoder.decode if gate is None else gate.wrap(self.decoder.decode)
        self.decodes = DecodeQueue(decode, REPLICAS)

    def stage(self, clock: Clock, emit: Emit, input_rate: int = SAMPLE_RATE) -> AsrStage:
        """A fresh stage for one audio stream at ``input_rate``."""
        s = self.settings
        vad = VoiceActivityDetector(self.vad.fork(), s.vad, input_rate)
        return AsrStage(vad, StreamingRecognizer(s.asr), self.decodes, clock, emit, s.vad)
