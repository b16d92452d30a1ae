"""Voices: text in, mono float32 audio out. The stage needs nothing else from a TTS engine.

Two engines sit behind the one protocol: Piper (a neural model file, the default) and the
Debian ``espeak-ng`` program (formant synthesis through a subprocess, no model file), so that
nothing in the stage depends on how Piper happens to work.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from typing import Protocol

import numpy as np
from piper import PiperVoice as PiperModel
from piper.config import SynthesisConfig

from tts.piper import load_piper
from voice.audio import AudioFormatError, pcm16_to_float32
from voice.models import resolve
from voice.settings import Settings


class Voice(Protocol):
    """Synthesis of one chunk of text. Called from one worker thread at a time."""

    name: str
    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono samples in [-1, 1] at ``sample_rate``."""
        ...


class PiperVoice:
    """A Piper ONNX voice (onnxruntime, the project's thread budget)."""

    # Piper scales each sentence to peak at full scale; a little headroom keeps resampling
    # from clipping it.
    _CONFIG = SynthesisConfig(volume=0.9)

    def __init__(self, model: PiperModel, name: str) -> None:
        self._model = model
        self.name = name
        self.sample_rate: int = model.config.sample_rate

    @classmethod
    def load(cls, settings: Settings) -> PiperVoice:
        """The hash-checked ``tts-voice`` model."""
        path = resolve("tts-voice", settings).path
        return cls(
            load_piper(path, settings.tts.threads), f"piper:{path.name.removesuffix('.onnx')}"
        )

    def synthesize(self, text: str) -> np.ndarray:
        # Piper yields one chunk of audio per sentence.
        parts = [chunk.audio_float_array for chunk in self._model.synthesize(text, self._CONFIG)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed."""


class EspeakVoice:
    """Debian's ``espeak-ng`` program: robotic but instant, and independent of any model."""

    sample_rate = 22050  # what espeak-ng writes; checked against every WAV header
    _TIMEOUT_S = 30.0  # a chunk is at most a few dozen words: far longer means it hung

    def __init__(self, voice: str = "en-us") -> None:
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise EspeakError(
                "the espeak voice needs the espeak-ng program: install the Debian package "
                "espeak-ng (apt-get install espeak-ng)"
            )
        self._command = [binary, "--stdout", "-v", voice]
        self.name = f"espeak-ng:{voice}"

    def synthesize(self, text: str) -> np.ndarray:
        # The text goes through stdin, so text starting with "-" is never read as an option.
        try:
            done = subprocess.run(
                self._command, input=text.encode(), capture_output=True, timeout=self._TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise EspeakError(f"espeak-ng gave no audio within {self._TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise EspeakError(f"espeak-ng failed (exit {done.returncode}): {message}")
        rate, pcm = _wav_pcm16(done.stdout)
        if rate != self.sample_rate:
            raise EspeakError(f"espeak-ng wrote {rate} Hz audio, expected {self.sample_rate} Hz")
        return pcm16_to_float32(pcm[: len(pcm) // 2 * 2])


def _wav_pcm16(data: bytes) -> tuple[int, bytes]:
    """Rate and PCM bytes of a mono 16-bit WAV written to a pipe. Its size fields are
    placeholders (the writer could not seek back), so the data runs to the end of the bytes,
    which Python's ``wave`` module does not accept."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError("espeak-ng did not write a WAV stream")
    rate, position = 0, 12
    while position + 8 <= len(data):
        kind, size = data[position : position + 4], struct.unpack_from("<I", data, position + 4)[0]
        body = position + 8
        if kind == b"fmt ":
            channels, rate, _, _, bits = struct.unpack_from("<HIIHH", data, body + 2)
            if channels != 1 or bits != 16:
                raise AudioFormatError(f"espeak-ng wrote {channels} channels of {bits}-bit audio")
        elif kind == b"data":
            return rate, data[body:]
        position = body + size + size % 2
    raise AudioFormatError("espeak-ng's WAV stream has no audio data")


def load_voice(settings: Settings) -> Voice:
    """The voice ``tts.voice`` names."""
    if settings.tts.voice == "espeak":
        return EspeakVoice()
    return PiperVoice.load(settings)
