"""Real recorded speech with reference transcripts, from packages `make setup` installs.

- LibriVox: 5 read sentences in Debian's pocketsphinx-testdata (16 kHz).
- Asterisk prompts: 563 studio recordings of one speaker in asterisk-core-sounds-en-wav (8 kHz).
- A real two-speaker phone call (30 s, 16 kHz) with a segment transcript, from the
  pyannote-audio wheel (downloaded, not installed, into the cache by `make setup`).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voice.audio import read_wav

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")


class DatasetMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: np.ndarray  # float32 mono
    sample_rate: int
    text: str  # reference transcript
    source: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"{path} is missing: install {package} (`make setup` does)")
    return path


def librivox() -> list[Utterance]:
    lines = (
        (_need(LIBRIVOX_DIR, "Debian pocketsphinx-testdata") / "transcription")
        .read_text()
        .splitlines()
    )
    out = []
    for line in lines:
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if match:
            text, name = match.groups()
            audio, rate = read_wav(LIBRIVOX_DIR / f"{name}.wav")
            out.append(Utterance(f"librivox/{name}", audio, rate, text, "librivox"))
    return out


def asterisk(min_words: int = 4) -> list[Utterance]:
    """Prompts with at least ``min_words`` words of plain speech (no tone descriptions)."""
    _need(ASTERISK_DIR, "Debian asterisk-core-sounds-en-wav")
    with gzip.open(_need(ASTERISK_TRANSCRIPTS, "Debian asterisk-core-sounds-en"), "rt") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        name, sep, text = line.partition(":")
        text = text.strip()
        if not sep or line.startswith(";") or name.startswith("silence/") or "[" in text:
            continue
        path = ASTERISK_DIR / f"{name.strip()}.wav"
        if len(text.split()) < min_words or not path.is_file():
            continue
        audio, rate = read_wav(path)
        out.append(Utterance(f"asterisk/{name.strip()}", audio, rate, text, "asterisk"))
    return out


def phone_call(data_dir: Path) -> list[Utterance]:
    """Segments of the pyannote sample call, cut at the transcript's (.stm) boundaries."""
    folder = _need(data_dir / "pyannote", "the pyannote-audio sample (`make setup` fetches it)")
    audio, rate = read_wav(folder / "sample.wav")
    out = []
    for i, line in enumerate((folder / "sample.stm").read_text().splitlines()):
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        start, end = float(fields[3]), float(fields[4])
        segment = audio[int(start * rate) : int(end * rate)]
        out.append(Utterance(f"call/{i:02d}-{fields[2].lower()}", segment, rate, fields[5], "call"))
    return out
