"""The TTS stage on a virtual clock with a scripted voice: chunking, ordering, cancel, errors,
the draft cache, resampling and word times. The real voices are in test_tts_integration.py."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading

import numpy as np
import pytest

from tts import voices
from tts.stage import TtsStage
from tts.text import Chunker, speakable
from tts.timing import voicing, word_times
from voice.clock import VirtualClock
from voice.events import (
    AudioDone,
    AudioOut,
    DraftReady,
    Event,
    Metric,
    ResponseDone,
    ResponseSource,
    ResponseTextDelta,
    StageError,
)
from voice.settings import Settings, SettingsError, TtsSettings

LETTER_S = 0.05  # the scripted voice says each letter or digit in 50 ms
PAUSE_S = 0.3  # and pauses this long after a comma or full stop
EDGE_S = 0.1  # silence before and after each chunk


class ScriptedVoice:
    """Tone for letters, silence for pauses: instant, and its word times are known exactly.
    ``gate`` holds a synthesis until the test opens it; ``fail_on`` makes it raise."""

    name = "scripted"

    def __init__(self, sample_rate: int = 16000, fail_on: str = "") -> None:
        self.sample_rate = sample_rate
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def synthesize(self, text: str) -> np.ndarray:
        self.calls.append(text)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("the voice broke")
        parts = [self._silence(EDGE_S)]
        for token in text.split():
            letters = sum(ch.isalnum() for ch in token)
            t = np.arange(int(letters * LETTER_S * self.sample_rate)) / self.sample_rate
            parts.append((0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
            if token[-1] in ",.":
                parts.append(self._silence(PAUSE_S))
        parts.append(self._silence(EDGE_S))
        return np.concatenate(parts)

    def _silence(self, seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * self.sample_rate), np.float32)


class Harness:
    def __init__(
        self,
        voice: ScriptedVoice | None = None,
        output_rate: int = 24000,
        **settings: int,
    ) -> None:
        self.clock = VirtualClock()
        self.events: list[Event] = []
        self.voice = voice or ScriptedVoice()
        chunking = {"first_chunk_words": 4, "chunk_min_words": 6, "chunk_max_words": 40}
        self.stage = TtsStage(
            self.voice,
            TtsSettings(**(chunking | settings)),
            self.clock,
            self.events.append,
            output_rate,
        )

    def say(self, turn: int, *deltas: str, source: ResponseSource = "full") -> None:
        for text in deltas:
            self.stage.on_event(
                ResponseTextDelta(t=self.clock.now(), turn_id=turn, text=text, source=source)
            )

    def done(self, turn: int, cancelled: bool = False) -> None:
        self.stage.on_event(
            ResponseDone(t=self.clock.now(), turn_id=turn, text="", cancelled=cancelled)
        )

    async def finish(self) -> None:
        await self.stage.flush()
        await self.stage.close()

    def audio(self, turn: int | None = None) -> list[AudioOut]:
        return [
            e
            for e in self.events
            if isinstance(e, AudioOut) and (turn is None or e.turn_id == turn)
        ]

    def chunks(self, turn: int | None = None) -> list[str]:
        return [a.text for a in self.audio(turn)]

    def dones(self, turn: int) -> list[AudioDone]:
        return [e for e in self.events if isinstance(e, AudioDone) and e.turn_id == turn]

    def errors(self) -> list[StageError]:
        return [e for e in self.events if isinstance(e, StageError)]

    def metrics(self, name: str) -> list[Metric]:
        return [e for e in self.events if isinstance(e, Metric) and e.name == name]


def tokens(text: str) -> list[str]:
    """``text`` as an LLM streams it: each word with its leading space."""
    first, *rest = text.split(" ")
    return [first, *(" " + word for word in rest)]


# --- chunking -------------------------------------------------------------------------------


async def test_a_prefix_is_said_at_once_as_its_own_chunk():
    h = Harness()
    h.say(1, "Sure thing", source="prefix")  # no punctuation, fewer words than a first chunk
    await h.stage.flush()
    assert h.chunks(1) == ["Sure thing"]
    h.say(1, *tokens(" I can help you with that."), source="continuation")
    h.done(1)
    await h.finish()
    assert h.chunks(1) == ["Sure thing", "I can help you", "with that."]


async def test_the_first_chunk_ends_at_the_first_clause_before_the_next_token():
    h = Harness()
    h.say(1, "Well", ",")
    await h.stage.flush()
    assert h.chunks(1) == ["Well,"]  # a comma after a letter cannot be "1,000": cut at once
    h.say(1, " I", " guess", " so")
    h.done(1)
    await h.finish()
    assert h.chunks(1) == ["Well,", "I guess so"]


async def test_the_first_chunk_ends_after_first_chunk_words_complete_words():
    h = Harness(first_chunk_words=3)
    h.say(1, "one", " two", " three")
    await h.stage.flush()
    assert h.chunks(1) == []  # "three" may still go on ("threefold")
    h.say(1, " fo")
    await h.stage.flush()
    assert h.chunks(1) == ["one two three"]


async def test_later_chunks_end_at_boundaries_with_enough_words():
    h = Harness(chunk_min_words=6)
    text = (
        "Hi, it is nice to see you. The weather is lovely, but it will rain later, "
        "so take a coat. Bye."
    )
    h.say(1, *tokens(text))
    h.done(1)
    await h.finish()
    assert h.chunks(1) == [
        "Hi,",
        "it is nice to see you.",
        "The weather is lovely, but it will rain later,",
        "so take a coat. Bye.",
    ]


@pytest.mark.parametrize("seed", range(5))
async def test_no_chunk_is_ever_cut_inside_a_word(seed):
    text = (
        "Mr. Smith paid $3.50, i.e. about 1,000 yen, for don't-care items at 3:30 today; "
        "well-known U.S. shops (e.g. corner stores) sell them too. Really? Yes!"
    )
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 40))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    h = Harness(chunk_min_words=3)
    h.say(1, *deltas)
    h.done(1)
    await h.finish()
    chunks = h.chunks(1)
    assert " ".join(chunks).split() == text.split()
    assert chunks[0] == "Mr. Smith paid $3.50,"
    assert not any(c.endswith(("Mr.", "i.e.", "e.g.", "U.S.")) for c in chunks)


@pytest.mark.parametrize("punctuated", [True, False])
async def test_very_long_text_is_cut_into_capped_chunks(punctuated):
    words = [f"word{i % 97}" + ("," if punctuated and i % 13 == 12 else "") for i in range(750)]
    text = " ".join(words)
    assert len(text) >= 5000
    h = Harness(chunk_max_words=40)
    h.say(1, text)
    h.done(1)
    await h.finish()
    chunks = h.chunks(1)
    assert " ".join(chunks).split() == words
    assert max(len(c.split()) for c in chunks) <= 40
    assert len(chunks) >= 750 // 40
    assert not h.errors() and len(h.dones(1)) == 1


@pytest.mark.parametrize("text", ["", "   \n\t", "😀🎉👍🏽", "...!?", "** __ ``", "— –"])
async def test_unspeakable_text_gives_no_audio_and_one_audio_done(text):
    h = Harness()
    h.say(1, text)
    h.done(1)
    h.say(2, text, source="prefix")
    h.done(2)
    await h.finish()
    assert h.voice.calls == [] and h.audio() == [] and not h.errors()
    assert [len(h.dones(turn)) for turn in (1, 2)] == [1, 1]


async def test_markup_and_emoji_are_not_said_but_kept_in_the_text():
    h = Harness()
    h.say(1, "**Great** news 😀, _really_.")
    h.done(1)
    await h.finish()
    assert h.voice.calls == ["Great news,", "really."]
    assert h.chunks(1) == ["**Great** news 😀,", "_really_."]
    assert [w.text for w in h.audio(1)[0].words] == ["**Great**", "news"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("snake_case `code` # Title", "snake case code Title"),
        ("1️⃣ thumbs 👍🏽 up", "1 thumbs up"),
        ("Hi 👋!", "Hi!"),
        ("😀", ""),
        ("?!", ""),
    ],
)
def test_speakable(text, said):
    assert speakable(text) == said


def test_chunk_sizes_are_checked():
    with pytest.raises(ValueError, match="chunk_max_words"):
        Chunker(first_words=5, min_words=8, max_words=4)


# --- order, cancel, errors ------------------------------------------------------------------


async def test_chunks_come_in_order_and_audio_done_once_after_them():
    h = Harness()
    h.say(1, *tokens("One, two three four five six seven. Eight nine ten eleven twelve."))
    h.say(2, "Other turn.")
    h.done(2)
    h.done(1)
    h.done(1)  # a second ResponseDone changes nothing
    h.say(1, " Late text.")  # text after the reply ended is ignored
    h.done(3)  # a reply with no text at all
    await h.finish()
    ones = [e for e in h.events if getattr(e, "turn_id", None) == 1 and not isinstance(e, Metric)]
    assert [type(e).__name__ for e in ones] == ["AudioOut"] * 3 + ["AudioDone"]
    assert h.chunks(1) == [
        "One,",
        "two three four five six seven.",
        "Eight nine ten eleven twelve.",
    ]
    assert h.dones(1) == [AudioDone(t=0.0, turn_id=1, cancelled=False)]
    assert len(h.dones(2)) == len(h.dones(3)) == 1
    assert all("Late" not in call for call in h.voice.calls)


async def test_an_emit_that_raises_surfaces_in_flush_instead_of_a_hang():
    def emit(event: Event) -> None:
        if isinstance(event, AudioOut):
            raise RuntimeError("the session broke")

    stage = TtsStage(ScriptedVoice(), TtsSettings(), VirtualClock(), emit, 24000)
    stage.on_event(ResponseTextDelta(t=0.0, turn_id=1, text="Hello.", source="prefix"))
    with pytest.raises(RuntimeError, match="the session broke"):
        await stage.flush()


async def test_cancel_drops_queued_chunks_and_discards_the_one_in_flight():
    voice = ScriptedVoice()
    voice.gate = threading.Event()
    h = Harness(voice)
    h.say(1, "Hello there,", source="prefix")
    h.say(1, *tokens(" this chunk waits. And so does this one, for its turn."))
    h.done(1)
    assert await asyncio.to_thread(voice.entered.wait, 5)  # "Hello there," is in flight
    h.stage.cancel(1)
    voice.gate.set()
    h.say(1, " more")
    h.done(1)
    h.stage.cancel(1)
    h.say(2, "Next turn.")
    h.done(2)
    await h.finish()
    assert h.audio(1) == []
    assert h.dones(1) == [AudioDone(t=0.0, turn_id=1, cancelled=True)]
    assert voice.calls == ["Hello there,", "Next turn."]  # queued chunks never ran
    assert h.chunks(2) == ["Next turn."] and h.dones(2)[0].cancelled is False


async def test_a_cancelled_reply_and_an_unknown_turn_get_one_cancelled_audio_done():
    h = Harness()
    h.say(1, "Some words", " here")  # no chunk is complete yet
    h.done(1, cancelled=True)
    h.stage.cancel(7)
    h.stage.cancel(7)
    await h.finish()
    assert h.audio() == [] and h.voice.calls == []
    assert [d.cancelled for d in h.dones(1) + h.dones(7)] == [True, True]


async def test_a_voice_error_is_reported_and_the_reply_goes_on():
    h = Harness(ScriptedVoice(fail_on="boom"), chunk_min_words=3)
    h.say(1, *tokens("First part, then a boom goes off here. And the end is fine."))
    h.done(1)
    await h.finish()
    assert h.chunks(1) == ["First part,", "And the end is fine."]
    [error] = h.errors()
    assert error.stage == "tts" and "then a boom goes off here." in error.message
    assert "the voice broke" in error.message
    assert len(h.dones(1)) == 1


# --- drafts ---------------------------------------------------------------------------------


async def test_a_draft_is_synthesised_ahead_and_its_audio_reused_for_the_prefix():
    h = Harness()
    h.stage.on_event(DraftReady(t=0.0, transcript="can you help", text="Sure, let me see."))
    h.say(1, "Sure, let me see. ", source="prefix")  # the same words, ready or still in flight
    h.done(1)
    await h.finish()
    assert h.chunks(1) == ["Sure, let me see."]
    assert h.voice.calls == ["Sure, let me see."]  # said once, ahead of the turn
    assert h.metrics("tts.synth_ms")[0].labels == {"cache": "draft"}


async def test_only_the_last_two_drafts_are_kept():
    h = Harness()
    for text in ("First draft.", "Second draft.", "Third draft."):
        h.stage.on_event(DraftReady(t=0.0, transcript="", text=text))
    h.say(1, "Third draft.", source="prefix")
    h.say(2, "Second draft.", source="prefix")
    h.say(3, "First draft.", source="prefix")
    for turn in (1, 2, 3):
        h.done(turn)
    await h.finish()
    # The first draft was dropped (its synthesis too, unless it had started): said afresh.
    assert h.voice.calls.count("Second draft.") == h.voice.calls.count("Third draft.") == 1
    assert h.voice.calls[-1] == "First draft."
    assert [len(h.chunks(turn)) for turn in (1, 2, 3)] == [1, 1, 1]


# --- audio, word times, metrics -------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
async def test_audio_is_resampled_to_the_output_rate(rate):
    h = Harness(ScriptedVoice(sample_rate=22050), output_rate=rate)
    h.say(1, "Good morning to you all.", source="prefix")
    h.done(1)
    await h.finish()
    [out] = h.audio(1)
    expected = 2 * EDGE_S + 19 * LETTER_S + PAUSE_S
    assert out.sample_rate == rate and out.samples.dtype == np.float32
    assert out.duration == pytest.approx(expected, abs=0.002)


async def test_word_times_are_ordered_inside_the_chunk_and_follow_the_pauses():
    h = Harness()
    text = "Yes, a surprisingly long word, then short ones. Done."
    h.say(1, text, source="prefix")  # one chunk
    h.done(1)
    await h.finish()
    [out] = h.audio(1)
    words = out.words
    assert [w.text for w in words] == text.split()
    assert all(0 <= w.start <= w.end <= out.duration for w in words)
    assert all(a.end <= b.start for a, b in itertools.pairwise(words))
    # The scripted voice's true start times: letters at 50 ms, 0.3 s after each "," and ".".
    true, at = [], EDGE_S
    for token in text.split():
        true.append(at)
        at += sum(ch.isalnum() for ch in token) * LETTER_S + PAUSE_S * (token[-1] in ",.")
    assert [w.start for w in words] == pytest.approx(true, abs=0.02)


def test_word_times_without_pauses_spread_by_letters():
    audio = np.full(16000, 0.5, np.float32)
    audio[:1600] = 0.0  # 0.1 s of leading silence
    voiced = voicing(audio, 16000)
    assert (voiced.start, voiced.end, voiced.pauses) == (pytest.approx(0.1), pytest.approx(1.0), ())
    words = word_times("ab 😀 abcd", voiced)
    assert [(w.text, round(w.start, 3), round(w.end, 3)) for w in words] == [
        ("ab", 0.1, 0.4),
        ("abcd", 0.4, 1.0),
    ]
    assert voicing(np.zeros(100, np.float32), 16000).pauses == ()


async def test_synth_and_first_audio_metrics():
    h = Harness()
    h.say(1, "Hello")
    await h.clock.advance(0.25)  # the next token comes 250 ms later
    h.say(1, " there,", " friend")
    h.done(1)
    await h.finish()
    assert len(h.metrics("tts.synth_ms")) == len(h.audio(1)) == 2
    assert all(m.value >= 0 and m.turn_id == 1 for m in h.metrics("tts.synth_ms"))
    [first] = h.metrics("tts.first_audio_ms")
    assert first.value == pytest.approx(250.0) and first.turn_id == 1


# --- voices and settings --------------------------------------------------------------------


def test_the_espeak_voice_names_the_debian_package_when_missing(monkeypatch):
    monkeypatch.setattr(voices.shutil, "which", lambda name: None)
    with pytest.raises(voices.EspeakError, match=r"Debian package espeak-ng"):
        voices.EspeakVoice()


def test_the_voice_is_a_setting():
    assert Settings.load(env={}).tts.voice == "tts-voice"
    assert Settings.load(env={}, overrides=["tts.voice=espeak"]).tts.voice == "espeak"
    with pytest.raises(SettingsError, match=r"tts\.voice must be one of"):
        Settings.load(env={}, overrides=["tts.voice=kokoro"])
