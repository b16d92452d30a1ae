"""The real recogniser (Silero + Whisper tiny.en) on real speech, silence and noise."""

import asyncio
import itertools

import jiwer
import numpy as np
import pytest

from asr.recognizer import join_words
from asr.stage import AsrModels
from asr.whisper import DecodeRequest
from eval.asr import replay
from eval.datasets import Utterance, librivox
from eval.text import normalize
from voice.clock import RealClock
from voice.events import SpeechEnded, TranscriptFinal, TranscriptPartial
from voice.replay import stream
from voice.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models() -> AsrModels:
    return AsrModels(Settings.load(env={}))


def test_streams_a_librivox_sentence_with_partials_before_the_end(models):
    sentence = next(u for u in librivox() if u.id.endswith("0870"))  # 7 s, 22 words
    events = []

    async def main():
        clock = RealClock()
        stage = models.stage(clock, events.append, sentence.sample_rate)
        audio = np.concatenate([sentence.audio, np.zeros(sentence.sample_rate, np.float32)])
        await stream(clock, clock.now(), audio, sentence.sample_rate, stage.push)  # real time
        await stage.close()

    asyncio.run(main())
    finals = [e.text for e in events if isinstance(e, TranscriptFinal)]
    error = jiwer.wer(normalize(sentence.text), normalize(" ".join(finals)))
    assert error <= 0.15, (finals, error)
    first_end = next(i for i, e in enumerate(events) if isinstance(e, SpeechEnded))
    partials = [e for e in events[:first_end] if isinstance(e, TranscriptPartial)]
    assert len(partials) >= 5 and any(p.committed for p in partials)
    words = [w for e in events if isinstance(e, TranscriptFinal) for w in e.words]
    assert all(a.start <= b.start for a, b in itertools.pairwise(words))  # timestamps kept


@pytest.mark.parametrize("kind", ["silence", "white noise"])
def test_ten_seconds_of_silence_or_noise_give_no_text(models, kind):
    rng = np.random.default_rng(7)
    audio = (
        np.zeros(160_000, np.float32)
        if kind == "silence"
        else rng.normal(0, 0.1, 160_000).astype(np.float32)
    )
    result = asyncio.run(replay(models, Utterance(kind, audio, 16000, "", "test"), paced=False))
    assert result.transcript == ""


def test_a_sentence_whisper_starts_over_in_the_silence_pad_keeps_its_words(models):
    """Whisper tiny.en, given this sentence cut 40 ms after its end, reads it and then starts
    it again in the silence pad; the restart is dropped, not the sentence with it."""
    sentence = next(u for u in librivox() if u.id.endswith("0920"))
    audio = np.concatenate([np.zeros(3200, np.float32), sentence.audio])
    request = DecodeRequest(audio[round(0.224 * 16000) : round(6.016 * 16000)].copy(), 0.224)
    said = join_words(models.decoder.decode(request).words)
    assert normalize(said).endswith("more respectable than he was"), said
