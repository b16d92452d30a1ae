"""The relay's orchestration on a virtual clock with scripted backends (no models)."""

from __future__ import annotations

import asyncio

import pytest
from fakes import ScriptedModel, Verdict

from llm.backend import Message
from llm.relay import Draft, Relay, repeats_itself, seam_undecided, strip_seam
from voice.clock import VirtualClock, settle
from voice.cpu import CpuGate
from voice.events import (
    DraftReady,
    Event,
    ResponseDone,
    ResponseTextDelta,
    SpeechStarted,
    StageError,
    TurnEnded,
    TurnMaybeEnded,
    TurnResumed,
    TurnTranscript,
    TurnWords,
)
from voice.settings import LlmSettings


class Harness:
    def __init__(
        self,
        mode: str = "relay",
        accept: bool = True,
        slow: list[str] | None = None,
        gate: CpuGate | None = None,
        **kw,
    ):
        self.clock = VirtualClock()
        self.events: list[tuple[float, Event]] = []
        self.fast = ScriptedModel(self.clock, ["Sure", ",", " fast", " reply", "."])
        self.slow = ScriptedModel(
            self.clock, slow or [" love", " football", " because", " it", " is", " fun", "."], **kw
        )
        self.relay = Relay(
            LlmSettings(mode=mode),  # type: ignore[arg-type]
            self.fast,
            Verdict(accept),
            self.slow,
            self.clock,
            lambda e: self.events.append((round(self.clock.now(), 3), e)),
            gate,
        )

    async def send(self, event: Event) -> None:
        self.relay.on_event(event)
        await settle()

    async def run(self, seconds: float = 5.0) -> None:
        await self.clock.advance(seconds)
        await self.relay.wait()

    def deltas(self) -> list[tuple[float, str, str]]:
        return [(t, e.text, e.source) for t, e in self.events if isinstance(e, ResponseTextDelta)]

    def done(self) -> ResponseDone:
        (done,) = [e for _, e in self.events if isinstance(e, ResponseDone)]
        return done


@pytest.mark.parametrize(
    ("prefix", "continuation", "expected"),
    [
        ("Yes, I love", " love football.", " football."),
        ("Yes, I love", " I love it.", " it."),
        ("Sure,", " here it is.", " here it is."),
        ("Well", "", ""),
        ("No, no,", " no, no, it is.", " it is."),  # the repeated words' marks go with them
        ("Yes, I love", " love, really.", ", really."),
    ],
)
def test_strip_seam_drops_repeated_words(prefix, continuation, expected):
    assert strip_seam(prefix, continuation) == expected


@pytest.mark.parametrize(
    ("continuation", "undecided"),
    [
        ("", True),
        (" ", True),
        (" lo", True),  # may become "love"
        (" love", True),  # "love" or "lovely"
        (" love ", False),  # repeats "love": decided (strip one word)
        (" I", True),
        (" I love", True),
        (" I love foot", False),  # "I love" repeated; no longer ending of the prefix fits
        (" foot", False),  # no ending of "Yes, I love" begins with "foot": say it now
        (" yes, i love it", False),
    ],
)
def test_the_seam_is_decided_as_soon_as_no_repeat_is_possible(continuation, undecided):
    assert seam_undecided("Yes, I love", continuation) is undecided


async def test_speculative_draft_is_spoken_at_the_turn_end_and_the_slow_model_continues():
    h = Harness()
    await h.send(TurnMaybeEnded(t=0, transcript="Do you like football", p_complete=0.8))
    await h.clock.advance(0.2)  # the draft is ready before the turn is confirmed
    await h.send(TurnEnded(t=0.2, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0.2, transcript="Do you like football?"))
    await h.run()
    deltas = h.deltas()
    assert deltas[0] == (0.2, "Yes, I love", "prefix")  # no wait: speculation reused
    assert h.fast.drafts == ["Do you like football"] and h.slow.prefills == 1
    assert "".join(d[1] for d in deltas[1:]) == " football because it is fun."
    assert {d[2] for d in deltas[1:]} == {"continuation"}
    messages, prefix = h.slow.calls[0]
    assert prefix == "Yes, I love" and messages[-1].content == "Do you like football?"
    assert h.done().text == "Yes, I love football because it is fun."
    assert [m.role for m in h.relay.history] == ["system", "user", "assistant"]
    (ready,) = [(t, e) for t, e in h.events if isinstance(e, DraftReady)]
    assert ready[0] == 0.1 and ready[1].text == "Yes, I love"  # announced before the turn end


async def test_a_rejected_speculative_draft_is_not_announced():
    h = Harness(accept=False)
    await h.send(TurnMaybeEnded(t=0, transcript="Do you like football", p_complete=0.8))
    await h.clock.advance(0.2)
    assert not [e for _, e in h.events if isinstance(e, DraftReady)]


async def test_speech_start_prefills_the_history_of_the_models_in_use():
    h = Harness()
    h.relay.history.append(Message(role="user", content="earlier"))
    await h.send(SpeechStarted(t=0, audio_time=0.0))
    await h.relay.idle()
    assert h.fast.prefills == 1 and h.slow.prefills == 1
    cascaded = Harness(mode="cascaded")
    await cascaded.send(SpeechStarted(t=0, audio_time=0.0))
    await cascaded.relay.idle()
    assert cascaded.fast.prefills == 0 and cascaded.slow.prefills == 1


async def test_resumed_turn_drops_the_speculation_and_drafts_again():
    h = Harness()
    await h.send(TurnMaybeEnded(t=0, transcript="Do you", p_complete=0.6))
    await h.send(TurnResumed(t=0.05))
    await h.clock.advance(0.5)
    await h.send(TurnEnded(t=0.5, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0.5, transcript="Do you like football"))
    await h.run()
    assert h.fast.drafts == ["Do you", "Do you like football"]
    assert h.deltas()[0] == (0.6, "Yes, I love", "prefix")  # drafted after the turn ended


async def test_rejected_draft_lets_the_slow_model_answer_alone():
    h = Harness(accept=False, slow=["\n", "Football", " is", " great", "."])
    await h.send(TurnEnded(t=0, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Do you like football"))
    await h.run()
    assert {d[2] for d in h.deltas()} == {"full"}
    assert h.done().text == "Football is great." and h.slow.calls[0][1] == ""


async def test_cascaded_mode_never_drafts():
    h = Harness(mode="cascaded")
    await h.send(TurnMaybeEnded(t=0, transcript="hi", p_complete=0.9))
    await h.send(TurnEnded(t=0, transcript="hi", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="hi"))
    await h.run()
    assert h.fast.drafts == [] and {d[2] for d in h.deltas()} == {"full"}


async def test_fast_mode_answers_with_the_drafter_alone():
    h = Harness(mode="fast")
    await h.send(TurnEnded(t=0, transcript="hi", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="hi"))
    await h.run()
    assert h.done().text == "Sure, fast reply." and h.slow.calls == []


async def test_slow_backend_failing_mid_stream_ends_the_reply_with_a_reason():
    h = Harness(fail_at=5)
    await h.send(TurnEnded(t=0, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Do you like football"))
    await h.run()
    (error,) = [e for _, e in h.events if isinstance(e, StageError)]
    assert "server went away" in error.message and error.reply_failed
    assert h.done().text == "Yes, I love football because it is" and not h.done().cancelled


async def test_a_stalled_backend_times_out():
    h = Harness(mode="cascaded", step=15.0)  # longer than the first-token timeout
    await h.send(TurnEnded(t=0, transcript="hi", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="hi"))
    await h.run(30.0)
    (error,) = [e for _, e in h.events if isinstance(e, StageError)]
    assert "ended early" in error.message and error.reply_failed
    apology = LlmSettings().apology
    assert h.deltas() == [(10.0, apology, "full")] and h.done().text == apology


class Exploding(Verdict):
    async def accept(self, history, draft):
        raise RuntimeError("verifier weights corrupt")


async def test_a_model_that_throws_gets_an_apology_and_the_next_turn_is_answered():
    h = Harness()
    h.relay._verifier = Exploding(True)
    await h.send(TurnEnded(t=0, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Do you like football"))
    await h.run()
    (error,) = [e for _, e in h.events if isinstance(e, StageError)]
    assert "RuntimeError: verifier weights corrupt" in error.message and error.reply_failed
    assert h.done().text == LlmSettings().apology
    assert h.relay.history[-1] == Message(role="assistant", content=LlmSettings().apology)
    h.relay._verifier = Verdict(True)
    h.events.clear()
    await h.send(TurnEnded(t=5, transcript="And tennis", reason="test"))
    await h.send(TurnTranscript(t=5, transcript="And tennis"))
    await h.run()
    assert h.done().text.startswith("Yes, I love") and not any(
        isinstance(e, StageError) for _, e in h.events
    )


async def test_interruption_cancels_and_history_keeps_what_was_heard():
    h = Harness()
    await h.send(TurnEnded(t=0, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Do you like football"))
    await h.clock.advance(0.25)
    h.relay.interrupt("Yes, I")
    await settle()
    assert h.done().cancelled and h.done().text.startswith("Yes, I love")
    assert h.relay.history[-1] == Message(role="assistant", content="Yes, I")


async def test_interrupting_a_reply_already_written_truncates_its_history_entry():
    h = Harness()
    await h.send(TurnEnded(t=0, transcript="Do you like football", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Do you like football"))
    await h.run()  # the text is complete; its audio would still be playing
    h.relay.interrupt("Yes, I love football")
    assert h.relay.history[-1] == Message(role="assistant", content="Yes, I love football")
    assert not h.done().cancelled


async def test_the_slow_path_falls_back_to_the_turn_text_when_no_final_comes():
    h = Harness(mode="cascaded")
    await h.send(TurnEnded(t=0, transcript="partial words", reason="test"))
    await h.run()
    assert h.slow.calls[0][0][-1].content == "partial words"
    assert asyncio.get_running_loop()  # ran inside the loop


async def test_a_very_long_turn_keeps_only_its_last_words():
    h = Harness(mode="cascaded")
    long = " ".join(f"w{i}" for i in range(2000))
    await h.send(TurnEnded(t=0, transcript=long, reason="test"))
    await h.send(TurnTranscript(t=0, transcript=long))
    await h.run()
    words = h.slow.calls[0][0][-1].content.split()
    assert len(words) == 300 and words[-1] == "w1999"


async def drafted_then_ended(drafted: str, final: str) -> Harness:
    """A draft at a pause on ``drafted``; 0.2 s later the turn ends on ``final``."""
    h = Harness()
    await h.send(TurnMaybeEnded(t=0, transcript=drafted, p_complete=0.8))
    await h.clock.advance(0.2)
    await h.send(TurnEnded(t=0.2, transcript=final, reason="test"))
    await h.run()
    return h


async def test_a_draft_made_on_the_pause_still_opens_a_turn_that_grew_by_a_word():
    h = await drafted_then_ended("Do you like", "Do you like football?")
    assert h.fast.drafts == ["Do you like"] and h.deltas()[0] == (0.2, "Yes, I love", "prefix")


async def test_a_draft_still_opens_a_turn_whose_last_word_the_recogniser_revised():
    h = await drafted_then_ended("Welcome to the director.", "Welcome to the directory.")
    assert h.fast.drafts == ["Welcome to the director."]
    assert h.deltas()[0] == (0.2, "Yes, I love", "prefix")


async def test_a_draft_made_on_other_words_is_not_used():
    for drafted, final in [
        ("Do you like", "Do you hate tennis and golf"),
        ("I think I like", "I think I hate it"),  # one word revised, but not heard better
        ("Do you like", "Do you lime"),  # alike, but too few words agree before it
    ]:
        h = await drafted_then_ended(drafted, final)
        assert h.fast.drafts == [drafted, final]


async def test_a_draft_starts_while_the_user_speaks_and_the_slow_model_reads_the_words_after_it():
    h = Harness()
    await h.send(TurnMaybeEnded(t=0, transcript="Do you like", p_complete=0.8, speaking=True))
    await h.clock.advance(0.2)
    assert h.fast.drafts == ["Do you like"] and h.slow.prefills == 1
    await h.send(TurnMaybeEnded(t=0.2, transcript="Do you like football", p_complete=0.9))
    await h.clock.advance(0.01)
    assert h.fast.drafts == ["Do you like"] and h.slow.prefills == 2  # the draft still fits
    await h.send(TurnEnded(t=0.21, transcript="Do you like football", reason="test"))
    await h.run()
    assert h.deltas()[0] == (0.21, "Yes, I love", "prefix")


async def test_the_models_read_the_turn_while_the_user_speaks_newest_words_only():
    h = Harness()
    h.slow.prefill_s = 0.1
    for words in ["Do", "Do you", "Do you like", "Do you like tennis"]:
        await h.send(TurnWords(t=h.clock.now(), transcript=words))
        await h.clock.advance(0.03)
    await h.clock.advance(0.5)
    assert h.slow.prefilled == ["Do", "Do you like tennis"]  # the words in between: skipped
    assert h.fast.prefill_texts == ["Do", "Do you like tennis"]  # the drafter reads them too
    assert h.fast.drafts == []  # words alone draft nothing
    await h.send(TurnMaybeEnded(t=h.clock.now(), transcript="Do you like tennis", p_complete=0.9))
    await h.clock.advance(0.5)
    assert h.fast.drafts == ["Do you like tennis"]
    assert h.fast.prefill_texts == ["Do", "Do you like tennis"]  # already read: not again
    # The slow model reads the accepted draft after the same words: on commit it goes on at once.
    assert h.slow.prefilled == ["Do", "Do you like tennis", "Do you like tennis"]
    assert h.slow.prefill_texts == ["", "", "Yes, I love"]
    await h.send(TurnEnded(t=h.clock.now(), transcript="Do you like tennis", reason="test"))
    await h.run()
    messages, opening = h.slow.calls[0]  # the prompt it read
    assert messages[-1].content == "Do you like tennis" and opening == "Yes, I love"
    cascaded = Harness(mode="cascaded")
    await cascaded.send(TurnWords(t=0, transcript="Do you"))
    await cascaded.relay.idle()
    assert cascaded.slow.prefilled == ["Do you"] and cascaded.fast.prefills == 0
    fast = Harness(mode="fast")
    await fast.send(TurnWords(t=0, transcript="Do you"))
    await fast.relay.idle()
    assert fast.slow.prefills == 0  # the slow model has no part in this reply


async def test_the_draft_is_urgent_and_read_before_the_slow_model_even_after_the_turn_ends():
    """The turn ends while the drafter still reads: the draft, now the reply's prefix, still
    goes before the slow model's reading, and the slow model steps aside (the gate) while it is
    written: both need the cores, and the draft is heard first."""
    gate = CpuGate()
    h = Harness(gate=gate)
    h.fast.prefill_s = 0.05
    await h.send(TurnMaybeEnded(t=0, transcript="Do you like tennis", p_complete=0.9))
    await h.send(TurnEnded(t=0, transcript="Do you like tennis", reason="test"))
    await h.clock.advance(0.08)
    assert gate.busy and h.slow.prefills == 0
    await h.clock.advance(0.05)  # the draft is done
    assert not gate.busy and h.slow.prefills == 1
    await h.send(TurnTranscript(t=0.13, transcript="Do you like tennis"))
    await h.run()
    assert h.done().text == "Yes, I love football because it is fun."
    # While the user still speaks, a draft is no more urgent than the slow model's reading.
    await h.send(TurnMaybeEnded(t=6, transcript="And golf", p_complete=0.9, speaking=True))
    await h.clock.advance(0.01)
    assert h.fast.drafts[-1] == "And golf" and not gate.busy


async def test_a_failing_read_ahead_costs_only_speed():
    h = Harness()
    h.fast.prefill_fails = h.slow.prefill_fails = True
    await h.send(TurnWords(t=0, transcript="Do you like"))
    await h.send(TurnMaybeEnded(t=0, transcript="Do you like football", p_complete=0.9))
    await h.clock.advance(0.5)
    errors = [e for _, e in h.events if isinstance(e, StageError)]
    assert errors and all("pre-fill failed" in e.message and not e.reply_failed for e in errors)
    await h.send(TurnEnded(t=0.5, transcript="Do you like football", reason="test"))
    await h.run()
    assert h.done().text == "Yes, I love football because it is fun."


async def test_closing_stops_the_reading_ahead_without_waiting_for_it():
    """A conversation that ends leaves the shared models at once: its pre-fills still queued
    (here: one that would take a minute) are cancelled, not waited for."""
    h = Harness()
    h.slow.prefill_s = 60.0
    await h.send(SpeechStarted(t=0, audio_time=0))
    await h.send(TurnWords(t=0.5, transcript="Do you like"))
    assert h.slow.prefills  # reading, on the virtual clock: never finishes by itself
    await asyncio.wait_for(h.relay.close(), 1)
    assert h.clock.now() == 0


@pytest.mark.parametrize(
    ("text", "loops"),
    [
        ("no, no, no, no", True),
        ("no, no, no", False),  # people say that
        ("I do. I do. I do.", True),
        ("I do. I do.", False),
        ("I'm not sure if I'm even a fan anymore. I'm not sure if I'm even a fan anymore.", True),
        ("It is what it is.", False),
        ("", False),
    ],
)
def test_a_reply_that_loops_is_recognised(text, loops):
    assert repeats_itself(text) == loops


async def test_a_continuation_that_loops_ends_before_the_repeat_that_shows_it():
    h = Harness(slow=[" no", ",", " no", ",", " no", ",", " no", ",", " no", "."])
    h.fast.draft = lambda history, transcript: _draft("No, no,", transcript)  # type: ignore[method-assign]
    await h.send(TurnEnded(t=0, transcript="Is it over", reason="test"))
    await h.send(TurnTranscript(t=0, transcript="Is it over"))
    await h.run()
    # The continuation's first two "no"s repeat the prefix and are dropped at the seam; the
    # third "no" of the reply is said, the fourth would make a loop.
    assert h.done().text == "No, no, no," and not h.done().cancelled


async def _draft(text: str, transcript: str) -> Draft:
    return Draft(transcript=transcript, text=text, tokens=())
