"""The live session end to end on the real models: a LibriVox sentence in, a spoken reply out."""

import asyncio
import re

import numpy as np
import pytest

from asr.whisper import load_whisper
from eval.datasets import LIBRIVOX_DIR
from voice.audio import AudioFormatError, read_wav, resample
from voice.cli import main
from voice.clock import RealClock
from voice.engine import Engine
from voice.events import AudioFrame
from voice.models import resolve
from voice.settings import Settings
from voice.talk import talk

pytestmark = pytest.mark.integration

SENTENCE = LIBRIVOX_DIR / "sense_and_sensibility_01_austen_64kb-0870.wav"


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(Settings.load(env={}))
    yield engine
    engine.close()


def test_talk_answers_a_librivox_sentence_with_english_speech(engine, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    records = asyncio.run(talk(engine, SENTENCE, out, None))
    table = capsys.readouterr().out
    assert re.search(r"^1 \| .*Dashwood", table, re.MULTILINE), table
    (record,) = records
    assert record.first_audio_out_at is not None and record.reply_text, record.errors

    reply, rate = read_wav(out)
    assert rate == engine.settings.session.output_rate
    assert len(reply) / rate >= len(read_wav(SENTENCE)[0]) / 16000  # the input's length, at least
    assert float(np.sqrt(np.mean(reply**2))) > 0.005  # not silence

    whisper = load_whisper(resolve("asr", engine.settings).path, threads=2)
    segments, _ = whisper.transcribe(resample(reply, rate, 16000), language="en", beam_size=1)
    text = " ".join(s.text for s in segments).strip()
    assert len(re.findall(r"[A-Za-z']+", text)) >= 3, text


def test_audio_in_a_wrong_format_is_refused_clearly_and_the_session_goes_on(engine):
    async def run() -> None:
        session = engine.session(RealClock(), input_rate=16000)
        try:
            with pytest.raises(AudioFormatError, match="44100"):
                await session.push(
                    AudioFrame(t=0, samples=np.zeros(882, np.float32), sample_rate=44100)
                )
            with pytest.raises(AudioFormatError):
                await session.push(
                    AudioFrame(t=0, samples=np.full(320, np.nan, np.float32), sample_rate=16000)
                )
            await session.push(
                AudioFrame(t=0, samples=np.zeros(320, np.float32), sample_rate=16000)
            )
        finally:
            await session.close()

    asyncio.run(run())


def test_talk_refuses_a_file_that_is_not_audio_before_loading_models(tmp_path, capsys):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    assert main(["talk", str(bad)]) == 2
    assert "not a readable PCM WAV" in capsys.readouterr().err
