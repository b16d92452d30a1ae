"""Transcript normalisation for WER: what counts as the same words.

Whisper writes "Mr." and "7"; the references say "mister" and "seven". Both sides go through
the same function, so neither is favoured.
"""

from __future__ import annotations

import re

from num2words import num2words

_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "ok": "okay"}
_SYMBOLS = {"&": " and ", "%": " percent ", "#": " pound ", "*": " star ", "+": " plus "}
_NUMBER = re.compile(r"(\d+)(st|nd|rd|th)?")
_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def _spell_number(match: re.Match[str]) -> str:
    value = int(match.group(1))
    return " " + num2words(value, to="ordinal" if match.group(2) else "cardinal") + " "


def normalize(text: str) -> str:
    text = text.lower()
    for symbol, word in _SYMBOLS.items():
        text = text.replace(symbol, word)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = _NUMBER.sub(_spell_number, text)
    text = _NON_WORD.sub(" ", text.replace("-", " "))
    words = [_ABBREVIATIONS.get(w, w) for w in text.split()]
    return " ".join(w.strip("'") for w in words if w.strip("'"))
