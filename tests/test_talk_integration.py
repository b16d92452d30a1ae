"""`relayvoice talk` end to end on the real models: a LibriVox sentence in, a spoken reply out."""

import re

import numpy as np
import pytest

from asr.whisper import load_whisper
from eval.datasets import LIBRIVOX_DIR
from voice.audio import read_wav, resample
from voice.cli import main
from voice.models import resolve
from voice.settings import Settings

pytestmark = pytest.mark.integration


def test_talk_answers_a_librivox_sentence_with_english_speech(tmp_path, capsys):
    wav = LIBRIVOX_DIR / "sense_and_sensibility_01_austen_64kb-0870.wav"
    out = tmp_path / "reply.wav"
    assert main(["talk", str(wav), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^1 \| .*Dashwood", table, re.MULTILINE), table

    reply, rate = read_wav(out)
    assert rate == Settings.load(env={}).session.output_rate
    assert len(reply) / rate >= len(read_wav(wav)[0]) / 16000  # the input's length, at least
    assert float(np.sqrt(np.mean(reply**2))) > 0.005  # not silence

    settings = Settings.load(env={})
    whisper = load_whisper(resolve("asr", settings).path, threads=2)
    segments, _ = whisper.transcribe(resample(reply, rate, 16000), language="en", beam_size=1)
    text = " ".join(s.text for s in segments).strip()
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 3, text
