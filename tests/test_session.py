"""The session's event logic on a virtual clock: replies, barge-in, backchannels, resuming.

The relay is the real one over scripted models; recognition and end of turn are scripted by
routing their events in; the voice turns each word into 0.1 s of audio after 30 ms."""

from __future__ import annotations

import asyncio

import numpy as np
from fakes import FakeStages

from llm.backend import Message
from voice.clock import VirtualClock, settle
from voice.events import (
    AudioFrame,
    Event,
    Interrupted,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnMaybeEnded,
    TurnResumed,
    TurnTranscript,
    UserIntent,
)
from voice.session import Session, words_of
from voice.settings import RelayMode, SessionSettings

RATE = 8000


class Harness:
    def __init__(self, mode: RelayMode = "relay", accept: bool = True) -> None:
        self.clock = VirtualClock()
        self.stages = FakeStages(self.clock, accept=accept)
        self.events: list[tuple[float, Event]] = []
        self.session = Session(
            self.stages,  # type: ignore[arg-type]
            SessionSettings(false_interruption_ms=1000),
            self.clock,
            mode,
            input_rate=16000,
            output_rate=RATE,
            observer=lambda e: self.events.append((round(self.clock.now(), 3), e)),
        )
        self.played: list[np.ndarray] = []

    async def __aenter__(self) -> Harness:
        self.player = asyncio.create_task(self.session.playout.run(self.played.append))
        await settle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.player.cancel()
        await asyncio.gather(self.player, return_exceptions=True)
        await self.session.close()

    async def send(self, event: Event) -> None:
        self.session.route(event)
        await settle()

    async def user_turn(self, text: str, maybe: bool = True) -> None:
        """The user says ``text``; the turn ends 0.2 s after the speech does."""
        now = self.clock.now()
        await self.send(SpeechStarted(t=now, audio_time=now))
        await self.send(TranscriptPartial(t=now, committed=text, tentative=""))
        await self.send(SpeechEnded(t=now, audio_time=now))
        if maybe:
            await self.send(TurnMaybeEnded(t=now, transcript=text, p_complete=0.9))
        await self.clock.advance(0.2)
        await self.send(TurnEnded(t=self.clock.now(), transcript=text, reason="test"))
        await self.send(TurnTranscript(t=self.clock.now(), transcript=text))

    def of(self, kind: type) -> list:
        return [e for _, e in self.events if isinstance(e, kind)]

    def audible(self) -> float:
        """Seconds of reply audio played."""
        return sum(float((f > 0).sum()) for f in self.played) / RATE


async def test_a_reply_is_spoken_and_its_timeline_recorded():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(3.0)
        (record,) = h.session.records
        assert record.verdict == "accepted" and record.prefix_text == "Yes, I love"
        assert h.stages.fake_voice is not None
        assert h.stages.fake_voice.presynthesised == ["Yes, I love"]  # before the turn ended
        assert record.first_tts_audio_at is not None and record.first_audio_out_at is not None
        assert record.turn_ended_at <= record.first_tts_audio_at <= record.first_audio_out_at
        assert record.first_audio_out_at - record.first_tts_audio_at < 0.021  # next frame
        assert record.continuation_audio_out_at is not None
        assert record.continuation_audio_out_at > record.first_audio_out_at
        assert words_of(record.heard_text) == words_of("Yes, I love football because it is fun.")
        assert record.finished_at is not None and not record.interruption
        assert h.session.turn.last_assistant == record.reply_text


async def test_a_continuation_that_is_late_shows_as_a_gap():
    async with Harness() as h:
        h.stages.slow.step = 0.5  # the slow model cannot keep up with 0.3 s of prefix audio
        await h.user_turn("Do you like football")
        await h.clock.advance(6.0)
        (record,) = h.session.records
        assert record.gap_ms > 100


async def test_speech_over_a_reply_stops_it_at_once_and_history_keeps_what_was_heard():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.5)  # part of the reply has played
        heard_before = len(h.session.playout.heard_text().split())
        assert heard_before > 0
        played = h.audible()
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.clock.advance(0.1)
        assert h.audible() - played <= 0.02  # paused within one frame
        await h.send(TranscriptPartial(t=h.clock.now(), committed="no tell me", tentative=""))
        (stop,) = h.of(Interrupted)
        assert stop.reason == "barge-in" and len(stop.heard_text.split()) == heard_before
        await h.clock.advance(1.0)
        assert h.session.relay.history[-1] == Message(role="assistant", content=stop.heard_text)
        (record,) = h.session.records
        assert record.interruption == "barge-in" and record.stopped_at is not None
        assert record.stopped_at - record.speech_over_at < 0.1  # type: ignore[operator]
        assert h.audible() - played <= 0.02  # nothing more of that reply
        await h.user_turn("tell me about tennis instead", maybe=False)
        await h.clock.advance(3.0)
        assert [r.user_text for r in h.session.records][-1] == "tell me about tennis instead"


async def test_a_backchannel_does_not_interrupt():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.5)
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.send(TranscriptFinal(t=h.clock.now(), text="Yeah."))
        await h.send(TurnEnded(t=h.clock.now(), transcript="Yeah.", reason="test"))
        await h.clock.advance(3.0)
        assert not h.of(Interrupted) and h.session.relay.turn_id == 1
        (record,) = h.session.records
        assert words_of(record.heard_text) == words_of("Yes, I love football because it is fun.")


async def test_speech_with_no_words_pauses_then_resumes_the_reply():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.5)
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))  # a cough
        paused = h.audible()
        await h.clock.advance(0.9)
        assert h.audible() == paused
        await h.clock.advance(3.0)
        (record,) = h.session.records
        assert record.false_interruptions == 1 and not record.interruption
        assert words_of(record.heard_text) == words_of("Yes, I love football because it is fun.")


async def test_our_own_voice_coming_back_is_not_an_interruption():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.6)
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.send(TranscriptPartial(t=h.clock.now(), committed="love football", tentative=""))
        assert not h.of(Interrupted)


async def test_words_of_the_reply_not_yet_played_are_the_users_own():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.3)  # the prefix has begun; "because it is fun" is still to come
        assert "because" not in words_of(h.session.playout.played_text())
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.send(
            TranscriptPartial(t=h.clock.now(), committed="because it is fun", tentative="")
        )
        (stop,) = h.of(Interrupted)
        assert stop.reason == "barge-in"


async def test_a_stop_request_stops_the_reply_and_gets_no_answer():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.5)
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.send(UserIntent(t=h.clock.now(), intent="stop", text="wait"))
        (stop,) = h.of(Interrupted)
        assert stop.reason == "stop"
        await h.send(TurnEnded(t=h.clock.now(), transcript="wait", reason="test"))
        await h.clock.advance(2.0)
        assert h.session.relay.turn_id == 1 and len(h.session.records) == 1


async def test_a_maybe_end_over_a_reply_starts_no_speculation():
    async with Harness() as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.5)
        drafts = len(h.stages.fast.drafts)
        await h.send(TurnMaybeEnded(t=h.clock.now(), transcript="mm", p_complete=0.9))
        await h.clock.advance(0.5)
        assert len(h.stages.fast.drafts) == drafts


async def test_a_rejected_draft_is_recorded_and_the_slow_model_speaks_alone():
    async with Harness(accept=False) as h:
        await h.user_turn("Do you like football")
        await h.clock.advance(3.0)
        (record,) = h.session.records
        assert record.verdict == "rejected" and record.prefix_text == ""
        assert record.continuation_audio_out_at is None
        assert words_of(record.heard_text) == words_of("love football because it is fun.")


async def test_audio_frames_reach_recognition_and_end_of_turn():
    async with Harness() as h:
        frame = AudioFrame(t=0, samples=np.zeros(320, dtype=np.float32), sample_rate=16000)
        await h.session.push(frame)
        assert h.session.asr.frames == [frame]  # type: ignore[attr-defined]


async def test_a_model_that_fails_mid_reply_ends_that_reply_and_the_conversation_goes_on():
    async with Harness(accept=False) as h:
        h.stages.slow.fail_at = 2
        await h.user_turn("Do you like football")
        await h.clock.advance(3.0)
        (error,) = h.of(StageError)
        assert error.stage == "llm" and "server went away" in error.message
        (record,) = h.session.records
        assert words_of(record.heard_text) == ["love", "football"]
        assert record.errors == [f"llm: {error.message}"]
        h.stages.slow.fail_at = None
        await h.user_turn("And tennis")
        await h.clock.advance(3.0)
        assert len(h.session.records) == 2
        assert words_of(h.session.records[-1].heard_text)[-2:] == ["is", "fun"]


async def test_the_mode_can_change_between_replies():
    async with Harness() as h:
        h.session.set_mode("cascaded")
        await h.user_turn("Do you like football")
        await h.clock.advance(3.0)
        (record,) = h.session.records
        assert record.mode == "cascaded" and record.verdict == "none"
        assert h.stages.fast.drafts == []


async def test_a_speculation_dropped_when_the_user_goes_on_is_not_spoken():
    async with Harness() as h:
        now = h.clock.now()
        await h.send(SpeechStarted(t=now, audio_time=now))
        await h.send(SpeechEnded(t=now, audio_time=now))
        await h.send(TurnMaybeEnded(t=now, transcript="I was thinking", p_complete=0.7))
        await h.clock.advance(0.2)
        await h.send(TurnResumed(t=h.clock.now()))
        await h.send(SpeechStarted(t=h.clock.now(), audio_time=0))
        await h.clock.advance(1.0)
        await h.send(SpeechEnded(t=h.clock.now(), audio_time=0))
        text = "I was thinking about the weather in Paris tomorrow"
        await h.send(TurnEnded(t=h.clock.now(), transcript=text, reason="test"))
        await h.send(TurnTranscript(t=h.clock.now(), transcript=text))
        await h.clock.advance(3.0)
        assert h.stages.fast.drafts == ["I was thinking", text]  # drafted again
        (record,) = h.session.records
        assert record.user_text == text and record.verdict == "accepted"


async def test_closing_mid_reply_leaves_nothing_busy():
    h = Harness()
    async with h:
        await h.user_turn("Do you like football")
        await h.clock.advance(0.3)
        assert h.session.busy
    assert not h.session.busy and len(h.session.records) == 1
