"""The end-of-turn policy on a virtual clock, with scripted VAD/ASR events and scripted models."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import pytest

from turn.detector import AUDIO_MODEL_RATE, TurnDetector
from voice.clock import VirtualClock, settle
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
from voice.settings import TurnSettings

FRAME = 0.02


class InlineExecutor(Executor):
    """Runs the audio model at once, so virtual time alone orders what happens."""

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


@dataclass(frozen=True)
class Prediction:
    p_complete: float
    intent: str


class ScriptedText:
    def __init__(self, answers: dict[str, tuple[float, str]]) -> None:
        self.answers = answers
        self.seen: list[str] = []

    def predict(self, text: str, last_assistant: str | None = None) -> Prediction:
        self.seen.append(text)
        return Prediction(*self.answers.get(text, (0.5, "continue")))


class Harness:
    """Streams 20 ms frames on a virtual clock and delivers scripted ASR events in between."""

    def __init__(
        self,
        p_audio: float | Callable[[np.ndarray], float] = 0.5,
        text: dict[str, tuple[float, str]] | None = None,
        rate: int = 16000,
        **settings: object,
    ) -> None:
        self.clock = VirtualClock()
        self.events: list[tuple[float, Event]] = []  # all but TurnWords
        self.words: list[tuple[float, str]] = []  # the TurnWords transcripts
        self.text = ScriptedText(text or {})
        audio_model = p_audio if callable(p_audio) else (lambda audio: p_audio)
        self.rate = rate
        # Fixed policy numbers, so the arithmetic below does not follow tuned defaults.
        policy = {"audio_weight": 0.5, "min_silence_ms": 100, "max_silence_ms": 1500}
        policy |= {"silence_curve": 2.0} | settings
        self.detector = TurnDetector(
            TurnSettings(**policy),  # type: ignore[arg-type]
            self.clock,
            self._collect,
            audio_model,
            self.text,
            input_rate=rate,
            executor=InlineExecutor(),
        )

    def _collect(self, event: Event) -> None:
        t = round(self.clock.now(), 3)
        if isinstance(event, TurnWords):
            self.words.append((t, event.transcript))
        else:
            self.events.append((t, event))

    async def run_until(self, t: float) -> None:
        """Stream audio until stream time ``t`` (clock and stream time advance together)."""
        while self.detector.stream_time < t - 1e-9:
            await self.clock.advance(FRAME)
            self.detector.push_audio(np.zeros(int(FRAME * self.rate), np.float32))
            await settle()

    async def send(self, event: Event) -> None:
        self.detector.on_event(event)
        await settle()

    def of(self, kind: type) -> list[tuple[float, Event]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind) and not _speaking(e)]

    def at_pauses(self) -> list[type]:
        """Event types, leaving out maybe-ends sent while the user was still speaking."""
        return [type(e) for _, e in self.events if not _speaking(e)]


def _speaking(event: Event) -> bool:
    return isinstance(event, TurnMaybeEnded) and event.speaking


async def speak(h: Harness, partial: str, until: float = 1.0, final: str | None = None) -> None:
    """Speech from 0.2 s to ``until``; the VAD notices its end 80 ms later."""
    await h.run_until(0.2)
    await h.send(SpeechStarted(t=h.clock.now(), audio_time=0.2))
    await h.run_until(until - 0.3)
    await h.send(TranscriptPartial(t=h.clock.now(), committed="", tentative=partial))
    await h.run_until(until + 0.08)
    await h.send(SpeechEnded(t=h.clock.now(), audio_time=until))
    if final is not None:
        await h.send(TranscriptFinal(t=h.clock.now(), text=final))


async def test_complete_sentence_with_confident_models_ends_after_little_silence():
    h = Harness(p_audio=0.9, text={"I want a pizza.": (0.9, "end")})
    await speak(h, "I want a pizza.", final="I want a pizza.")
    # The words alone say done: maybe-ended before the audio model has answered.
    assert h.at_pauses() == [TurnMaybeEnded, Metric, Metric]  # final: again
    assert h.of(Metric)[0][1].labels == {
        "audio": "0.9000",
        "text": "0.9000",
        "silence_start": "1.000",
    }
    await h.run_until(3.0)
    (t_end, ended), (t_final, transcript) = h.of(TurnEnded)[0], h.of(TurnTranscript)[0]
    # p = 0.9: silence needed = 100 + 1400 * 0.1 ** 2 = 114 ms after speech stopped at 1.0 s.
    assert t_end == pytest.approx(1.12, abs=0.021)
    assert ended.transcript == "I want a pizza." and "p=0.90" in ended.reason
    assert transcript.transcript == "I want a pizza." and t_final == t_end


async def test_incomplete_words_wait_long_and_speech_resuming_cancels_quietly():
    h = Harness(p_audio=0.2, text={"and then I": (0.1, "continue")})
    await speak(h, "and then I")
    await h.run_until(1.6)  # p = 0.15 needs 1.11 s of silence
    await h.send(SpeechStarted(t=h.clock.now(), audio_time=1.6))
    await h.run_until(4.0)
    assert h.of(TurnEnded) == [] and h.of(TurnMaybeEnded) == [] and h.of(TurnResumed) == []


async def test_words_that_sound_finished_signal_a_maybe_end_before_the_audio_model_answers():
    h = Harness(p_audio=0.1, text={"I want a pizza.": (0.9, "end")})
    await speak(h, "I want a pizza.")
    assert h.at_pauses() == [TurnMaybeEnded, Metric]  # then the audio's answer
    (_, maybe) = h.of(TurnMaybeEnded)[0]
    assert maybe.p_complete == 0.9 and maybe.transcript == "I want a pizza."
    assert h.of(Metric)[0][1].value == pytest.approx(0.5)  # fused: no second maybe-end


async def test_words_that_sound_finished_while_the_user_speaks_are_worth_a_draft():
    h = Harness(text={"I want a pizza.": (0.9, "end"), "I want": (0.1, "continue")})
    await h.run_until(0.2)
    await h.send(SpeechStarted(t=h.clock.now(), audio_time=0.2))
    await h.send(TranscriptPartial(t=h.clock.now(), committed="", tentative="I want"))
    assert h.events == []  # unfinished words: nothing to draft
    for _ in range(2):  # the same words again: one maybe-end only
        await h.send(TranscriptPartial(t=h.clock.now(), committed="", tentative="I want a pizza."))
    ((t, maybe),) = [(t, e) for t, e in h.events if isinstance(e, TurnMaybeEnded)]
    assert maybe.speaking and maybe.transcript == "I want a pizza." and t == 0.2
    assert h.of(TurnMaybeEnded) == []  # no pause yet


async def test_maybe_end_then_resumed_when_the_user_goes_on():
    h = Harness(p_audio=0.6, text={"I think so": (0.6, "end")})
    await speak(h, "I think so")
    await h.run_until(1.2)  # p = 0.6 needs 324 ms: not yet
    await h.send(SpeechStarted(t=h.clock.now(), audio_time=1.2))
    assert [k for k in h.at_pauses() if k is not Metric] == [TurnMaybeEnded, TurnResumed]
    await h.run_until(4.0)
    assert h.of(TurnEnded) == []


async def test_a_late_final_that_completes_the_sentence_brings_the_end_forward():
    h = Harness(
        p_audio=0.5,
        text={"I went to the": (0.05, "continue"), "I went to the store.": (0.95, "end")},
    )
    await speak(h, "I went to the")  # p = 0.275 at first: 830 ms of silence
    await h.run_until(1.2)
    assert h.of(TurnEnded) == []
    await h.send(TranscriptFinal(t=h.clock.now(), text="I went to the store."))
    await h.run_until(1.4)
    # p = 0.725 needs 100 + 1400 * 0.275 ** 2 = 206 ms instead of 830 ms.
    (t_end, ended) = h.of(TurnEnded)[0]
    assert t_end == pytest.approx(1.206, abs=0.021) and ended.transcript == "I went to the store."


async def test_turn_ends_on_the_partial_and_the_final_text_follows():
    h = Harness(p_audio=0.95, text={"book a table": (0.95, "end")})
    await speak(h, "book a table")
    await h.run_until(1.5)
    (_, ended) = h.of(TurnEnded)[0]
    assert ended.transcript == "book a table" and h.of(TurnTranscript) == []
    await h.send(TranscriptFinal(t=h.clock.now(), text="Book a table."))
    assert [e.transcript for _, e in h.of(TurnTranscript)] == ["Book a table."]
    # The next turn starts clean: the late final is not carried into it.
    assert h.detector.transcript == ""


async def test_hard_maximum_ends_the_turn_whatever_the_models_say():
    h = Harness(p_audio=0.0, text={"so": (0.0, "continue")}, max_silence_ms=1500)
    await speak(h, "so", final="so")
    await h.run_until(4.0)
    (t_end, _) = h.of(TurnEnded)[0]
    assert t_end == pytest.approx(2.5, abs=0.021)


async def test_fixed_mode_is_a_plain_timeout_without_models():
    clock = VirtualClock()
    events: list[Event] = []
    detector = TurnDetector(TurnSettings(mode="fixed"), clock, events.append, None, None)
    detector.on_event(SpeechStarted(t=0, audio_time=0.2))
    detector.on_event(TranscriptFinal(t=0, text="hello there"))
    detector.push_audio(np.zeros(16000, np.float32))
    detector.on_event(SpeechEnded(t=0, audio_time=0.9))
    await settle()
    await clock.advance(0.69)
    assert not any(isinstance(e, TurnEnded) for e in events)
    await clock.advance(0.02)
    assert [e.reason for e in events if isinstance(e, TurnEnded)] == ["fixed 800 ms"]


def test_adaptive_mode_needs_both_models():
    with pytest.raises(ValueError, match="audio and the text model"):
        TurnDetector(TurnSettings(), VirtualClock(), print, None, None)


async def test_noise_without_words_is_not_a_turn():
    h = Harness(p_audio=0.9)
    await speak(h, "")
    await h.run_until(3.0)
    assert h.of(TurnEnded) == []  # deadline passed, but the final is still due
    await h.send(TranscriptFinal(t=h.clock.now(), text=""))
    await h.run_until(4.0)
    assert h.of(TurnEnded) == [] and h.of(TurnTranscript) == []


async def test_a_short_word_whose_final_comes_after_the_deadline_still_ends_the_turn():
    h = Harness(p_audio=0.9, text={"Yes.": (0.9, "end")})
    await speak(h, "")
    await h.run_until(2.0)
    await h.send(TranscriptFinal(t=h.clock.now(), text="Yes."))
    assert [e.transcript for _, e in h.of(TurnEnded)] == ["Yes."]
    assert [e.transcript for _, e in h.of(TurnTranscript)] == ["Yes."]


async def test_stop_request_is_reported_once_while_it_is_said():
    h = Harness(text={"stop": (0.9, "stop"), "stop stop": (0.9, "stop")})
    await h.send(TranscriptPartial(t=0, committed="", tentative="stop"))
    await h.send(TranscriptPartial(t=0, committed="", tentative="stop stop"))
    assert [(e.intent, e.text) for _, e in h.of(UserIntent)] == [("stop", "stop")]


async def test_a_failing_audio_model_is_reported_and_the_text_still_decides():
    def broken(audio: np.ndarray) -> float:
        raise RuntimeError("onnx went away")

    h = Harness(p_audio=broken, text={"Thanks.": (1.0, "end")})
    await speak(h, "Thanks.", final="Thanks.")
    await h.run_until(3.0)
    assert "onnx went away" in h.of(StageError)[0][1].message
    (t_end, _) = h.of(TurnEnded)[0]
    assert t_end < 1.5  # p = 0.75 with the failed model counted as unsure


async def test_audio_model_gets_8_s_at_16_khz_whatever_the_input_rate():
    seen: list[int] = []

    def model(audio: np.ndarray) -> float:
        seen.append(len(audio))
        return 0.9

    h = Harness(p_audio=model, rate=8000, text={"ok": (0.9, "end")})
    await speak(h, "ok", final="ok")
    assert seen == [round(1.08 * AUDIO_MODEL_RATE)]  # all 1.08 s so far, resampled to 16 kHz


async def test_the_turns_words_so_far_go_out_whenever_they_change():
    h = Harness()
    await h.send(SpeechStarted(t=0, audio_time=0))
    await h.send(TranscriptPartial(t=0, committed="I want", tentative="a"))
    await h.send(TranscriptPartial(t=0, committed="I want", tentative="a"))  # no news
    await h.send(TranscriptPartial(t=0, committed="I want a", tentative="pizza"))
    await h.send(SpeechEnded(t=0, audio_time=0))
    await h.send(TranscriptFinal(t=0, text="I want a pizza."))
    await h.send(SpeechStarted(t=0, audio_time=0))
    await h.send(TranscriptPartial(t=0, committed="", tentative="with cheese"))
    assert [w for _, w in h.words] == [
        "I want a",
        "I want a pizza",
        "I want a pizza.",
        "I want a pizza. with cheese",
    ]
