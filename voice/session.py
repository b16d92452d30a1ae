"""One conversation: VAD and ASR → end of turn → relay → TTS → the audio-out queue.

Stages never call each other; they emit typed events and ``Session._route`` hands each one to
whoever needs it. The session owns what spans stages: the conversation (the relay's history),
the audio the user hears (``Playout``) and full duplex. Speech over a reply pauses it at once;
words that are neither a backchannel ("yeah") nor the echo of our own voice make it an
interruption (the reply stops and history keeps only the words heard); a stop request ("wait")
stops it and waits; speech with no words in ``false_interruption_ms`` (a cough, a door)
resumes it.

Each reply leaves one ``TurnRecord``: the timeline from the user's end of speech to the
reply's last sample, as measured where the audio leaves the session.

A model that fails costs one reply (the relay apologises); ``session.max_errors`` failed
replies end the conversation: ``SessionFailed`` tells the transport to hang up, with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from llm.relay import Relay
from voice.clock import Clock
from voice.events import (
    AudioDone,
    AudioFrame,
    AudioOut,
    DraftReady,
    Event,
    Interrupted,
    ResponseDone,
    ResponseTextDelta,
    SessionFailed,
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
from voice.playout import Playout, PlayoutTurn
from voice.settings import RelayMode, SessionSettings

Observer = Callable[[Event], None]
Verdict = Literal["accepted", "rejected", "none"]
_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")
RECENT_TRANSCRIPTS = 8  # final-transcript delays kept, to tell whether recognition keeps up


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Listener(Protocol):
    """The ASR stage as the session uses it."""

    async def push(self, frame: AudioFrame) -> None: ...

    async def close(self) -> None: ...


class TurnTaker(Protocol):
    """The end-of-turn detector as the session uses it."""

    last_assistant: str | None

    def push_audio(self, samples: np.ndarray) -> None: ...

    def on_event(self, event: Event) -> None: ...

    async def close(self) -> None: ...


class Voice(Protocol):
    """The TTS stage as the session uses it."""

    def on_event(self, event: Event) -> None: ...

    def cancel(self, turn_id: int) -> None: ...

    async def close(self) -> None: ...


class Stages(Protocol):
    """Builds one conversation's stages around shared models (``voice.engine.Engine``)."""

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> Listener: ...

    def turn(self, clock: Clock, emit: Observer, input_rate: int) -> TurnTaker: ...

    def relay(self, clock: Clock, emit: Observer, mode: RelayMode) -> Relay: ...

    def voice(self, clock: Clock, emit: Observer, output_rate: int) -> Voice: ...


@dataclass
class TurnRecord:
    """One reply's timeline (clock seconds) and what was said and heard."""

    turn_id: int
    mode: str
    user_text: str = ""
    speech_ended_at: float | None = None  # the VAD's end of the user's last segment
    maybe_ended_at: float | None = None
    turn_ended_at: float = 0.0
    turn_reason: str = ""
    transcript_at: float | None = None  # the turn's final transcript known
    prefix_text: str = ""
    verdict: Verdict = "none"  # the verifier on the draft; "none" when no draft was made
    first_text_at: float | None = None
    first_tts_audio_at: float | None = None  # first chunk synthesised
    first_audio_out_at: float | None = None  # first sample handed to the listener
    continuation_audio_out_at: float | None = None  # first sample after the prefix's audio
    gap_ms: float = 0.0  # silence inside the reply, once it had begun
    finished_at: float | None = None
    reply_text: str = ""
    heard_text: str = ""
    speech_over_at: float | None = None  # the user started speaking over the reply
    stopped_at: float | None = None  # playback stopped by that speech
    interruption: str = ""  # "", "barge-in" or "stop"
    false_interruptions: int = 0  # pauses that resumed: no words came
    errors: list[str] = field(default_factory=list)

    def ms_after_speech(self, at: float | None) -> float | None:
        """``at`` in ms after the user's speech ended (None: it, or the end of speech, did not
        happen); clock values mean nothing outside the process, these do."""
        if at is None or self.speech_ended_at is None:
            return None
        return round((at - self.speech_ended_at) * 1000, 1)

    def timeline_ms(self) -> dict[str, float | None]:
        """Every instant but the origin, as ``<name>_ms`` after the user's speech ended."""
        return {
            f.name.removesuffix("_at") + "_ms": self.ms_after_speech(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name.endswith("_at") and f.name != "speech_ended_at"
        }


class Session:
    def __init__(
        self,
        stages: Stages,
        settings: SessionSettings,
        clock: Clock,
        mode: RelayMode,
        input_rate: int,
        output_rate: int,
        observer: Observer | None = None,
        on_record: Callable[[TurnRecord], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self._settings = settings
        self._clock = clock
        self.mode = mode
        self._observer = observer
        self._on_record = on_record  # each reply's timeline, once its audio has ended
        self.asr = stages.asr(clock, self.route, input_rate)
        self.turn = stages.turn(clock, self.route, input_rate)
        self.relay = stages.relay(clock, self.route, mode)
        self.voice = stages.voice(clock, self.route, output_rate)
        self.playout = Playout(output_rate, clock, self._on_playout_finished)
        self._backchannels = {
            tuple(words_of(b)) for b in settings.backchannels.split(",") if words_of(b)
        }
        self.records: list[TurnRecord] = []
        self._open: dict[int, TurnRecord] = {}  # replies still being written or played
        self._speech_ended_at: float | None = None
        self._maybe_ended_at: float | None = None
        self._speech_over: asyncio.Task[None] | None = None  # speech over a reply, undecided
        self._ignore_turn = False  # the user asked the assistant to stop: no answer
        self.failed_replies: set[int] = set()  # turn ids
        self.failure: str | None = None  # why the conversation was ended, once it was
        # seconds from the VAD's end of a segment to its final transcript, latest last
        self.transcript_delays: deque[float] = deque(maxlen=RECENT_TRANSCRIPTS)

    def set_mode(self, mode: RelayMode) -> None:
        """relay, cascaded or fast from the next reply on (the page's mode switch)."""
        self.mode = self.relay.mode = mode

    # --- input -------------------------------------------------------------------------------

    async def push(self, frame: AudioFrame) -> None:
        """One frame of the user's audio (validated by the ASR stage)."""
        await self.asr.push(frame)
        self.turn.push_audio(frame.samples)

    async def close(self) -> None:
        """End the conversation: no new turns, the reply stopped, every stage finished."""
        self._cancel_speech_over()
        await self.asr.close()
        await self.turn.close()
        await self.relay.close()
        await self.voice.close()
        self.playout.stop()  # its record, if any, is kept as stopped
        self._open.clear()

    # --- routing -----------------------------------------------------------------------------

    def route(self, event: Event) -> None:
        """Every stage's ``emit``: hand the event on, then tell the observer."""
        match event:
            case SpeechStarted():
                self.turn.on_event(event)
                self.relay.on_event(event)
                self._on_speech_started(event)
            case SpeechEnded():
                self._speech_ended_at = event.t
                self.turn.on_event(event)
            case TranscriptPartial() | TranscriptFinal():
                self.turn.on_event(event)
                self._on_words(event.text, final=isinstance(event, TranscriptFinal))
                if isinstance(event, TranscriptFinal) and self._speech_ended_at is not None:
                    self.transcript_delays.append(event.t - self._speech_ended_at)
            case TurnWords():
                if self._listening:
                    self.relay.on_event(event)
            case TurnMaybeEnded():
                self._maybe_ended_at = event.t
                if self._listening:
                    self.relay.on_event(event)
            case TurnResumed():
                self._maybe_ended_at = None
                self.relay.on_event(event)
            case TurnEnded():
                self._on_turn_ended(event)
            case TurnTranscript():
                self.relay.on_event(event)
                record = self._open.get(self.relay.turn_id)
                if record is not None:
                    record.user_text, record.transcript_at = event.transcript, event.t
            case UserIntent(intent="stop"):
                self._on_stop_request()
            case DraftReady():
                self.voice.on_event(event)
            case ResponseTextDelta():
                self.voice.on_event(event)
                self._on_text(event)
            case ResponseDone():
                self.voice.on_event(event)
                self.turn.last_assistant = event.text
                if (record := self._open.get(event.turn_id)) is not None:
                    record.reply_text = event.text
            case AudioOut():
                self._on_audio(event)
            case AudioDone():
                self.playout.produced_all(event.turn_id)
            case StageError():
                if (record := self._open.get(self.relay.turn_id)) is not None:
                    record.errors.append(f"{event.stage}: {event.message}")
        if self._observer is not None:
            self._observer(event)
        if isinstance(event, StageError) and event.reply_failed:
            self._on_failed_reply(event)  # after the error itself is told

    def _on_failed_reply(self, error: StageError) -> None:
        self.failed_replies.add(self.relay.turn_id)
        if len(self.failed_replies) >= self._settings.max_errors and self.failure is None:
            self.failure = (
                f"{len(self.failed_replies)} replies failed; the last: "
                f"{error.stage}: {error.message}"
            )
            self.route(SessionFailed(t=self._clock.now(), reason=self.failure))

    @property
    def open_records(self) -> list[TurnRecord]:
        """Replies still being written or played (their timelines incomplete)."""
        return list(self._open.values())

    @property
    def busy(self) -> bool:
        """A reply is being written or played."""
        return bool(self._open) or self.playout.speaking

    @property
    def _listening(self) -> bool:
        """No reply is playing, or the user has already cut it off."""
        return not self.playout.speaking

    # --- replies -----------------------------------------------------------------------------

    def _on_turn_ended(self, event: TurnEnded) -> None:
        ignore, self._ignore_turn = self._ignore_turn, False
        if ignore or (not self._listening and self._not_an_interruption(event.transcript)):
            return  # "yeah" over a reply, or "stop": no answer
        self.relay.on_event(event)
        turn_id = self.relay.turn_id
        self.playout.start(turn_id)
        self._open[turn_id] = TurnRecord(
            turn_id=turn_id,
            mode=self.mode,
            user_text=event.transcript,
            speech_ended_at=self._speech_ended_at,
            maybe_ended_at=self._maybe_ended_at,
            turn_ended_at=event.t,
            turn_reason=event.reason,
        )
        self._maybe_ended_at = None

    def _on_text(self, event: ResponseTextDelta) -> None:
        record = self._open.get(event.turn_id)
        if record is None:
            return
        if record.first_text_at is None:
            record.first_text_at = event.t
            if self.mode == "relay":
                record.verdict = "accepted" if event.source == "prefix" else "rejected"
        if event.source == "prefix":
            record.prefix_text += event.text
        record.reply_text += event.text

    def _on_audio(self, chunk: AudioOut) -> None:
        record = self._open.get(chunk.turn_id)
        if record is None or self.playout.turn is None:
            return  # a reply already stopped or superseded
        if self.playout.turn.turn_id != chunk.turn_id:
            return
        if record.first_tts_audio_at is None:
            record.first_tts_audio_at = chunk.t
        self.playout.enqueue(chunk)

    def _on_playout_finished(self, played: PlayoutTurn) -> None:
        """The playout's callback: a reply's audio ended, or was stopped."""
        record = self._open.pop(played.turn_id, None)
        if record is None:
            return
        record.first_audio_out_at = played.first_audio_at
        if record.prefix_text and len(played.chunk_started_at) > 1:
            record.continuation_audio_out_at = played.chunk_started_at[1]
        record.gap_ms = played.gap_s * 1000
        record.finished_at = played.finished_at
        record.stopped_at = played.stopped_at if record.interruption else None
        record.heard_text = " ".join(played.heard)
        self.records.append(record)
        if self._on_record is not None:
            self._on_record(record)

    # --- full duplex ---------------------------------------------------------------------------

    def _on_speech_started(self, event: SpeechStarted) -> None:
        if self._listening or self._speech_over is not None:
            return
        self.playout.pause()  # at once: the user may be taking the floor
        record = self._open.get(self.playout.turn.turn_id) if self.playout.turn else None
        if record is not None and record.speech_over_at is None:
            record.speech_over_at = event.t
        self._speech_over = asyncio.create_task(self._resume_unless_words())

    async def _resume_unless_words(self) -> None:
        await self._clock.sleep(self._settings.false_interruption_ms / 1000)
        self._speech_over = None
        self._resume()

    def _resume(self) -> None:
        if self.playout.turn is not None and self.playout.paused:
            self.playout.resume()
            if (record := self._open.get(self.playout.turn.turn_id)) is not None:
                record.false_interruptions += 1

    def _on_words(self, text: str, final: bool) -> None:
        if self._speech_over is None:
            return
        if not self._not_an_interruption(text):
            self.interrupt("barge-in")
        elif final:  # the segment ended on a backchannel or an echo
            self._cancel_speech_over()
            self._resume()

    def _not_an_interruption(self, text: str) -> bool:
        """Backchannel, our own voice coming back, or too few words to take the floor."""
        heard = words_of(text)
        if tuple(heard) in self._backchannels:
            return True
        # Only what has played can come back as echo: words of the reply not yet played that
        # the user says are theirs (a user who goes on after a pause often says them).
        own = set(words_of(self.playout.played_text()))
        fresh = [w for w in heard if w not in own]
        echo = bool(heard) and len(fresh) <= len(heard) // 4
        return echo or len(fresh) < self._settings.interrupt_min_words

    def _on_stop_request(self) -> None:
        if not self._listening:
            self.interrupt("stop")
            self._ignore_turn = True

    def interrupt(self, reason: str) -> None:
        """Stop the reply now (barge-in, a stop request, or a client's cancel); history keeps
        what was heard."""
        self._cancel_speech_over()
        turn = self.playout.turn
        if turn is None:
            return
        record = self._open.get(turn.turn_id)
        if record is not None:
            record.interruption = reason
        heard = " ".join(turn.heard)
        self.relay.interrupt(heard)
        self.voice.cancel(turn.turn_id)
        self.playout.stop()
        self.route(
            Interrupted(t=self._clock.now(), turn_id=turn.turn_id, reason=reason, heard_text=heard)
        )

    def _cancel_speech_over(self) -> None:
        if self._speech_over is not None:
            self._speech_over.cancel()
            self._speech_over = None
