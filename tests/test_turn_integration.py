"""The real end-of-turn models (smart-turn v3.2, the shipped text model) on real speech."""

import asyncio

import numpy as np
import pytest

from asr.stage import AsrModels
from eval.asr import speech_end
from eval.datasets import librivox
from eval.turn import LEAD_S, TAIL_S, Scenario, replay
from turn.detector import TurnModels
from voice.audio import AudioFormatError
from voice.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.load(env={})


@pytest.fixture(scope="module")
def turn_models(settings) -> TurnModels:
    return TurnModels(settings)


def test_a_finished_sentence_ends_the_turn_once_after_speech(settings, turn_models):
    sentence = next(u for u in librivox() if u.id.endswith("0930"))
    rate = sentence.sample_rate
    audio = np.concatenate(
        [
            np.zeros(int(LEAD_S * rate), np.float32),
            sentence.audio,
            np.zeros(int(TAIL_S * rate), np.float32),
        ]
    )
    scenario = Scenario(sentence.id, "end", audio, rate, LEAD_S + speech_end(sentence.audio, rate))
    outcome = asyncio.run(replay(AsrModels(settings), turn_models, scenario))
    assert not outcome.cut_off("adaptive") and not outcome.cut_off("baseline")
    assert len(outcome.ended["adaptive"]) == 1 and len(outcome.ended["baseline"]) == 1
    # Each decides once, after the end, within its longest wait (plus the VAD's own lag).
    longest = settings.turn.max_silence_ms + 500
    assert outcome.latency_ms("adaptive") < longest
    assert outcome.latency_ms("baseline") < settings.turn.fixed_silence_ms + 500


@pytest.mark.parametrize("seconds", [0.0, 0.3, 12.0])
def test_smart_turn_pads_short_audio_and_keeps_the_last_8_s(turn_models, seconds):
    rng = np.random.default_rng(1)
    audio = rng.normal(0, 0.05, int(seconds * 16000)).astype(np.float32)
    p = turn_models.audio.p_complete(audio)
    assert 0.0 <= p <= 1.0
    assert turn_models.audio.features(audio).shape == (80, 800)


def test_smart_turn_hears_a_finished_sentence_as_more_complete_than_a_cut_one(turn_models):
    sentence = next(u for u in librivox() if u.id.endswith("0870"))
    complete = turn_models.audio.p_complete(sentence.audio)
    cut = turn_models.audio.p_complete(sentence.audio[: int(2.3 * 16000)])  # mid-word-run
    assert complete > cut, (complete, cut)


def test_smart_turn_rejects_bad_audio(turn_models):
    with pytest.raises(AudioFormatError, match="NaN"):
        turn_models.audio.p_complete(np.full(1600, np.nan, np.float32))
