"""The end-of-turn detector: VAD pauses, the audio model and the text model, fused.

At every pause (the ASR stage's speech-ended) it asks two models how complete the turn
sounds: smart-turn on the last 8 s of audio (intonation, run on a worker thread) and the text
model on the words so far. Their weighted mean ``p`` sets how much silence ends the turn
(``TurnSettings``): a finished sentence with falling pitch needs little, "and then I..." needs
a lot, and nothing waits longer than the hard maximum. A late final transcript updates ``p``
and moves the deadline. Events out:

- ``TurnMaybeEnded`` as soon as a pause has ``p >= maybe_threshold``, or the text model's
  P(complete) alone does while the audio model is still running (speculative work starts),
- ``TurnEnded`` when the silence reaches the deadline,
- ``TurnResumed`` when speech returns after a maybe-end,
- ``UserIntent("stop")`` when the words ask the assistant to stop or wait,
- ``TurnWords`` whenever the turn's words so far change.

Silence is measured in stream time (samples pushed), so a decision never depends on how late
an event happened to be delivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from turn.smart_turn import SmartTurnModel
from turn.text_model import TextTurnModel
from voice.audio import RingBuffer, check_rate, resample
from voice.clock import Clock
from voice.cpu import CpuGate, single_thread_blas
from voice.events import (
    Event,
    Metric,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnMaybeEnded,
    TurnResumed,
    TurnTranscript,
    TurnWords,
    UserIntent,
)
from voice.models import resolve
from voice.settings import Settings, TurnSettings

AUDIO_MODEL_RATE = 16000
AUDIO_MODEL_SECONDS = 8

Emit = Callable[[Event], None]
AudioModel = Callable[[np.ndarray], float]  # 16 kHz audio, newest last -> P(complete)


class TextPrediction(Protocol):
    @property
    def p_complete(self) -> float: ...

    @property
    def intent(self) -> str: ...


class TextModel(Protocol):
    def predict(self, text: str, last_assistant: str | None = None) -> TextPrediction: ...


def silence_needed(settings: TurnSettings, p: float) -> float:
    """Seconds of silence that end the turn at fused P(complete) ``p``."""
    s = settings
    if s.mode == "fixed":
        return s.fixed_silence_ms / 1000
    share = (1 - min(max(p, 0.0), 1.0)) ** s.silence_curve
    return (s.min_silence_ms + (s.max_silence_ms - s.min_silence_ms) * share) / 1000


@dataclass
class _Pause:
    """One silence inside (or at the end of) the user's turn."""

    silence_start: float  # stream seconds where the VAD heard speech stop
    p_audio: float | None = None
    p_text: float | None = None
    maybe_sent: bool = False
    due: str | None = None  # the deadline passed with no words yet: end when the final has some


class TurnDetector:
    def __init__(
        self,
        settings: TurnSettings,
        clock: Clock,
        emit: Emit,
        audio_model: AudioModel | None,
        text_model: TextModel | None,
        input_rate: int = AUDIO_MODEL_RATE,
        executor: Executor | None = None,
    ) -> None:
        if settings.mode == "adaptive" and (audio_model is None or text_model is None):
            raise ValueError("adaptive end-of-turn needs the audio and the text model")
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._audio_model = audio_model
        self._text_model = text_model
        self._rate = check_rate(input_rate)
        self._executor = executor  # None: asyncio's default thread pool
        self._audio = RingBuffer(self._rate * AUDIO_MODEL_SECONDS)
        self._finals: list[str] = []  # final transcripts of the current user turn
        self._partial = ""
        self._ended: list[str] = []  # finals of the turn already ended, while more are due
        self._late_finals = 0  # finals still due for that turn
        self._open_segments = 0  # speech-ended seen, its final not yet
        self._pause: _Pause | None = None
        self._timer: asyncio.Task[None] | None = None
        self._assessing: set[asyncio.Task[None]] = set()
        self._stop_sent = False
        self._drafted_on = ""  # the words the last speaking maybe-end was sent for
        self._words_sent = ""  # the transcript the last TurnWords carried
        self.last_assistant: str | None = None  # the assistant's last reply, for the text model

    @property
    def stream_time(self) -> float:
        return self._audio.total / self._rate

    @property
    def transcript(self) -> str:
        return " ".join(t for t in [*self._finals, self._partial] if t)

    def push_audio(self, samples: np.ndarray) -> None:
        """The user's audio at the input rate, the same frames the ASR stage gets."""
        self._audio.write(samples)

    def on_event(self, event: Event) -> None:
        """Feed the ASR stage's events; others are ignored."""
        if isinstance(event, SpeechStarted):
            self._on_speech()
        elif isinstance(event, SpeechEnded):
            self._open_segments += 1
            self._on_pause(event.audio_time)
        elif isinstance(event, TranscriptPartial):
            self._partial = event.text
            self._check_words()
        elif isinstance(event, TranscriptFinal):
            self._on_final(event.text)

    async def close(self) -> None:
        self._cancel_timer()
        for task in list(self._assessing):
            task.cancel()
        await asyncio.gather(*self._assessing, return_exceptions=True)

    # --- evidence ------------------------------------------------------------------------

    def _on_speech(self) -> None:
        pause, self._pause = self._pause, None
        self._cancel_timer()
        if pause is not None and pause.maybe_sent:
            self._emit(TurnResumed(t=self._clock.now()))

    def _on_pause(self, silence_start: float) -> None:
        self._pause = _Pause(silence_start)
        if self._settings.mode == "fixed":
            self._schedule()
            return
        task = asyncio.create_task(self._assess_audio(self._pause))
        self._assessing.add(task)
        task.add_done_callback(self._assessing.discard)
        self._assess_text()

    def _on_final(self, text: str) -> None:
        self._open_segments = max(0, self._open_segments - 1)
        if self._late_finals:  # belongs to the turn already handed over
            self._late_finals -= 1
            self._ended += [text] if text else []
            if not self._late_finals:
                self._emit(TurnTranscript(t=self._clock.now(), transcript=" ".join(self._ended)))
            return
        self._partial = ""
        if text:
            self._finals.append(text)
        self._check_words()
        pause = self._pause
        if pause is not None and pause.due is not None:
            if self._open_segments == 0:
                self._end(pause.due)
        elif pause is not None and self._settings.mode == "adaptive":
            self._assess_text()

    async def _assess_audio(self, pause: _Pause) -> None:
        audio = self._audio.last(self._audio.capacity)
        if self._rate != AUDIO_MODEL_RATE:
            audio = resample(audio, self._rate, AUDIO_MODEL_RATE)
        assert self._audio_model is not None
        try:
            p = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._audio_model, audio
            )
        except Exception as exc:  # the text model and the hard maximum still decide
            self._emit(StageError(t=self._clock.now(), stage="turn", message=f"audio model: {exc}"))
            p = 0.5
        if pause is self._pause:
            pause.p_audio = p
            self._update()

    def _assess_text(self) -> None:
        pause = self._pause
        assert pause is not None and self._text_model is not None
        pause.p_text = self._text_model.predict(self.transcript, self.last_assistant).p_complete
        if pause.p_audio is None and pause.p_text >= self._settings.maybe_threshold:
            self._maybe(pause, pause.p_text)  # the words say done: speculate while audio runs
        self._update()

    def _check_words(self) -> None:
        """New words: a stop request ("wait", "shh") is news at once, pause or not; words
        that sound finished while the user still speaks are worth a speculative draft."""
        if not self.transcript:
            return
        if self.transcript != self._words_sent:
            self._words_sent = self.transcript
            self._emit(TurnWords(t=self._clock.now(), transcript=self.transcript))
        if self._text_model is None:
            return
        words = self._text_model.predict(self.transcript, self.last_assistant)
        if words.intent == "stop" and not self._stop_sent:
            self._stop_sent = True
            self._emit(UserIntent(t=self._clock.now(), intent="stop", text=self.transcript))
        speaking = self._pause is None and self._settings.mode == "adaptive"
        finished = words.p_complete >= self._settings.maybe_threshold
        if speaking and finished and self.transcript != self._drafted_on:
            self._drafted_on = self.transcript
            self._emit(
                TurnMaybeEnded(
                    t=self._clock.now(),
                    transcript=self.transcript,
                    p_complete=words.p_complete,
                    speaking=True,
                )
            )

    # --- decision --------------------------------------------------------------------------

    def p_complete(self, pause: _Pause) -> float | None:
        """The fused P(complete), once the audio model has answered."""
        if pause.p_audio is None or pause.p_text is None:
            return None
        w = self._settings.audio_weight
        return w * pause.p_audio + (1 - w) * pause.p_text

    def _update(self) -> None:
        pause = self._pause
        p = None if pause is None else self.p_complete(pause)
        if pause is None or p is None:
            return
        assert pause.p_audio is not None and pause.p_text is not None
        self._emit(
            Metric(
                t=self._clock.now(),
                name="turn.p_complete",
                value=p,
                labels={
                    "audio": f"{pause.p_audio:.4f}",
                    "text": f"{pause.p_text:.4f}",
                    "silence_start": f"{pause.silence_start:.3f}",
                },
            )
        )
        if p >= self._settings.maybe_threshold:
            self._maybe(pause, p)
        self._schedule(p)

    def _maybe(self, pause: _Pause, p: float) -> None:
        if not pause.maybe_sent and self.transcript:
            pause.maybe_sent = True
            self._emit(
                TurnMaybeEnded(t=self._clock.now(), transcript=self.transcript, p_complete=p)
            )

    def _schedule(self, p: float = 0.0) -> None:
        """(Re)arm the deadline: the silence this pause needs, or the hard maximum."""
        assert self._pause is not None
        self._cancel_timer()
        needed = silence_needed(self._settings, p)
        wait = self._pause.silence_start + needed - self.stream_time
        deadline = self._clock.now() + max(0.0, wait)
        pause = self._pause
        reason = (
            f"fixed {needed * 1000:.0f} ms"
            if self._settings.mode == "fixed"
            else f"p={p:.2f} (audio {pause.p_audio:.2f}, text {pause.p_text:.2f}) "
            f"silence {needed * 1000:.0f} ms"
        )
        self._timer = asyncio.create_task(self._end_at(deadline, reason))

    async def _end_at(self, deadline: float, reason: str) -> None:
        await self._clock.sleep_until(deadline)
        self._timer = None
        if self.transcript:
            self._end(reason)
        elif self._open_segments and self._pause is not None:
            self._pause.due = reason  # a final is on its way: words decide whether this was a turn
        else:
            self._pause = None  # the pause followed noise: no words, no turn

    def _end(self, reason: str) -> None:
        transcript, finals = self.transcript, self._finals
        self._pause = None
        self._finals, self._partial, self._stop_sent = [], "", False
        self._drafted_on = self._words_sent = ""
        if not transcript:
            return
        self._emit(TurnEnded(t=self._clock.now(), transcript=transcript, reason=reason))
        if self._open_segments:  # the recogniser is still finalising: the text may change
            self._ended = finals
            self._late_finals, self._open_segments = self._open_segments, 0
        else:
            self._emit(TurnTranscript(t=self._clock.now(), transcript=transcript))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TurnModels:
    """The end-of-turn models, loaded once and shared by every conversation."""

    def __init__(self, settings: Settings, gate: CpuGate | None = None) -> None:
        """``gate``: the audio model's runs count as urgent work (the turn waits on them)."""
        self.settings = settings
        single_thread_blas()
        self.audio = SmartTurnModel(
            resolve("turn-audio", settings).path, settings.turn.audio_model_threads
        )
        self._audio_model = (
            self.audio.p_complete if gate is None else gate.wrap(self.audio.p_complete)
        )
        self.text = TextTurnModel.load()

    def detector(
        self, clock: Clock, emit: Emit, input_rate: int = AUDIO_MODEL_RATE, **overrides: object
    ) -> TurnDetector:
        """A fresh detector for one conversation; ``overrides`` replace turn settings."""
        settings = dataclasses.replace(self.settings.turn, **overrides)  # type: ignore[arg-type]
        return TurnDetector(
            settings, clock, emit, self._audio_model, self.text, input_rate=input_rate
        )
