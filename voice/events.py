"""Typed events: the only thing stages exchange.

Every event carries ``t``, the time (on the session's clock, seconds) at which it was produced.
Audio is mono float32 in [-1, 1]; its rate travels with it, so no stage guesses a format.
Events are frozen: a stage never changes what another stage sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ResponseSource = Literal["prefix", "continuation", "full"]
Intent = Literal["continue", "end", "stop"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFrame:
    """A chunk of user audio entering the pipeline."""

    t: float
    samples: np.ndarray  # float32, mono
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStarted:
    t: float
    audio_time: float  # where in the input stream (seconds) speech began


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechEnded:
    t: float
    audio_time: float  # where in the input stream (seconds) speech ended


@dataclass(frozen=True, slots=True, kw_only=True)
class Word:
    text: str
    start: float  # seconds in the input stream
    end: float
    probability: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptPartial:
    """Committed words will not change; the tentative tail may."""

    t: float
    committed: str
    tentative: str
    words: tuple[Word, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(part for part in (self.committed, self.tentative) if part)


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptFinal:
    t: float
    text: str
    words: tuple[Word, ...] = ()
    compute_ms: float = 0.0  # work spent finalising after speech ended


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnWords:
    """The words of the user's turn so far (every segment's final, then the partial), sent
    whenever they change: the slow model can read them while the user still speaks."""

    t: float
    transcript: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnMaybeEnded:
    """Early, speculative: the user may have finished. Work started on it may be thrown away.

    ``speaking``: the words so far sound finished but the user has not paused yet."""

    t: float
    transcript: str
    p_complete: float
    speaking: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEnded:
    """Confirmed: the assistant may speak."""

    t: float
    transcript: str  # best known now; see TurnTranscript for the final one
    reason: str  # which evidence decided, for metrics and debugging


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnTranscript:
    """The ended turn's complete final transcript. ``TurnEnded`` may fire on a partial
    transcript, before the recogniser's last final is back; this follows once it is."""

    t: float
    transcript: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnResumed:
    """The user went on after a maybe-end: drop speculative work."""

    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UserIntent:
    """What the user's words mean for the assistant's turn (e.g. "stop" while it speaks)."""

    t: float
    intent: Intent
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseTextDelta:
    t: float
    turn_id: int
    text: str
    source: ResponseSource


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseDone:
    t: float
    turn_id: int
    text: str
    cancelled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftReady:
    """A speculative prefix the verifier accepted, before the turn is confirmed: the voice
    can synthesise it now so that it plays the instant the turn ends."""

    t: float
    transcript: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioOut:
    """A chunk of assistant audio and the text it speaks. ``words`` time each word from the
    chunk's first sample (seconds), so history can keep exactly what was heard."""

    t: float
    turn_id: int
    samples: np.ndarray  # float32, mono
    sample_rate: int
    text: str = ""
    words: tuple[Word, ...] = ()

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioDone:
    """The last chunk of a reply's audio has been produced (not yet played)."""

    t: float
    turn_id: int
    cancelled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Interrupted:
    t: float
    turn_id: int
    reason: str
    heard_text: str  # what the user actually heard before playback stopped


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    t: float
    name: str
    value: float
    turn_id: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageError:
    """A stage failed on some input; the session decides whether to go on. ``reply_failed``:
    the user lost (part of) a reply to it; other errors only cost speed or accuracy."""

    t: float
    stage: str
    message: str
    reply_failed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFailed:
    """Too many replies failed: the conversation is over, and the transport hangs up."""

    t: float
    reason: str


Event = (
    AudioFrame
    | SpeechStarted
    | SpeechEnded
    | TranscriptPartial
    | TranscriptFinal
    | TurnWords
    | TurnMaybeEnded
    | TurnEnded
    | TurnTranscript
    | TurnResumed
    | UserIntent
    | ResponseTextDelta
    | ResponseDone
    | DraftReady
    | AudioOut
    | AudioDone
    | Interrupted
    | Metric
    | StageError
    | SessionFailed
)
