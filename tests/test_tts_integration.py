"""The TTS stage with the real voices (Piper joe-medium and Debian espeak-ng), and Piper's
speech recognised back by the project's Whisper recogniser."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import numpy as np
import pytest

from asr.stage import AsrModels
from asr.whisper import DecodeRequest
from tts.stage import TtsModels
from voice.clock import RealClock
from voice.events import AudioDone, AudioOut, Event, ResponseDone, ResponseTextDelta, StageError
from voice.settings import Settings

pytestmark = pytest.mark.integration

VOICES = ["tts-voice", "espeak"]


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict[str, TtsModels]]:
    models = {
        name: TtsModels(Settings.load(env={}, overrides=[f"tts.voice={name}"])) for name in VOICES
    }
    yield models
    for each in models.values():
        each.close()


def speak(models: TtsModels, text: str, rate: int = 24000) -> list[Event]:
    """Stream ``text`` word by word into a fresh stage, as the relay would, and collect
    everything it emits."""
    events: list[Event] = []

    async def main() -> None:
        clock = RealClock()
        stage = models.stage(clock, events.append, rate)
        first, *rest = text.split(" ")
        for token in [first, *(" " + word for word in rest)]:
            stage.on_event(ResponseTextDelta(t=clock.now(), turn_id=1, text=token, source="full"))
        stage.on_event(ResponseDone(t=clock.now(), turn_id=1, text=text))
        await stage.close()

    asyncio.run(main())
    return events


def audio_of(events: list[Event]) -> list[AudioOut]:
    return [e for e in events if isinstance(e, AudioOut)]


def check_ended_once(events: list[Event]) -> None:
    assert not [e for e in events if isinstance(e, StageError)]
    assert events[-1] == AudioDone(t=events[-1].t, turn_id=1, cancelled=False)
    assert sum(isinstance(e, AudioDone) for e in events) == 1


@pytest.mark.parametrize("voice", VOICES)
@pytest.mark.parametrize("text", ["", "😀🎉👍🏽"])
def test_empty_or_emoji_only_text_gives_no_audio(loaded, voice, text):
    events = speak(loaded[voice], text)
    assert audio_of(events) == []
    check_ended_once(events)


@pytest.mark.parametrize("voice", VOICES)
def test_five_thousand_characters_are_said_in_capped_non_silent_chunks(loaded, voice):
    sentences = [
        "The river runs past the old mill, and the children play by the water.",
        "In the evening the lamps come on one by one along the narrow street.",
        "My grandmother kept bees; their honey was dark, thick and sweet.",
        "Nobody knew where the path went, so we followed it into the hills!",
    ]
    punctuated = " ".join(sentences * 10)  # half with punctuation, half a run-on without
    run_on = re.sub(r"[^\w\s]", "", punctuated)
    text = f"{punctuated} {run_on}"
    assert len(text) >= 5000
    events = speak(loaded[voice], text)
    chunks = audio_of(events)
    assert " ".join(c.text for c in chunks).split() == text.split()  # every word said, in order
    assert len(chunks) >= 20
    assert max(len(c.text.split()) for c in chunks) <= loaded[voice].settings.tts.chunk_max_words
    for chunk in chunks:
        rms = float(np.sqrt(np.mean(np.square(chunk.samples))))
        assert rms > 0.01 and 0.3 < chunk.duration < 30, (chunk.text, rms, chunk.duration)
    check_ended_once(events)


@pytest.mark.parametrize("voice", VOICES)
@pytest.mark.parametrize("rate", [24000, 48000])
def test_audio_comes_at_the_output_rate(loaded, voice, rate):
    events = speak(loaded[voice], "Good morning, it is nice to meet you.", rate)
    chunks = audio_of(events)
    assert [c.text for c in chunks] == ["Good morning,", "it is nice to meet you."]
    for chunk in chunks:
        assert chunk.sample_rate == rate and chunk.samples.dtype == np.float32
        assert 0.1 < np.abs(chunk.samples).max() <= 1.0
        assert chunk.words[0].start >= 0 and chunk.words[-1].end <= chunk.duration
    assert 1.0 < sum(c.duration for c in chunks) < 5.0
    check_ended_once(events)


def test_piper_speech_is_recognised_back_with_matching_word_times(loaded):
    events = speak(loaded["tts-voice"], "Good morning, it is nice to meet you.", rate=16000)
    chunks = audio_of(events)
    audio = np.concatenate([c.samples for c in chunks])
    offsets = np.cumsum([0.0] + [c.duration for c in chunks])
    said = {
        re.sub(r"\W", "", w.text.lower()): offset + w.start
        for c, offset in zip(chunks[1:], offsets[1:], strict=False)
        for w in c.words
    }

    decoder = AsrModels(Settings.load(env={})).decoder
    heard = decoder.decode(DecodeRequest(audio=audio, offset=0.0)).words
    words = [re.sub(r"\W", "", w.text.lower()) for w in heard]
    assert "nice to meet you" in " ".join(words), words

    # Whisper's own word times are good to about 0.1 s; Piper samples its prosody (each run
    # differs), so times are compared on the words of the second chunk that were heard.
    errors = [abs(w.start - said[t]) for w, t in zip(heard, words, strict=True) if t in said]
    assert len(errors) >= 4, words
    assert np.mean(errors) < 0.2, errors
