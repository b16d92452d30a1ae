"""Deciding which recognised words are stable: LocalAgreement-2 and a repetition guard.

Pure functions over word lists, so the policy is tested on scripted hypotheses without a model.
"""

from __future__ import annotations

import re

from voice.events import Word

_NON_WORD = re.compile(r"[^\w']+")


def normalize_word(text: str) -> str:
    """Case and punctuation do not make two words different."""
    return _NON_WORD.sub("", text.lower())


def common_prefix(a: list[Word], b: list[Word]) -> int:
    """How many leading words two hypotheses share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if normalize_word(x.text) != normalize_word(y.text):
            break
        count += 1
    return count


class LocalAgreement:
    """Commit a word once two consecutive hypotheses agree on it (LocalAgreement-2).

    Hypotheses cover only the audio after what is committed. The last word of the newest
    hypothesis is never committed before the final decode: the audio may cut it in half.
    """

    def __init__(self) -> None:
        self.committed: list[Word] = []
        self._previous: list[Word] = []

    @property
    def tentative(self) -> list[Word]:
        return list(self._previous)

    def update(self, hypothesis: list[Word]) -> list[Word]:
        """Take a new hypothesis; return the words it commits."""
        agreed = min(common_prefix(self._previous, hypothesis), max(0, len(hypothesis) - 1))
        newly = hypothesis[:agreed]
        self.committed.extend(newly)
        self._previous = hypothesis[agreed:]
        return newly

    def force(self, words: list[Word]) -> None:
        """Commit the leading tentative ``words`` without waiting for agreement."""
        self.committed.extend(words)
        self._previous = self._previous[len(words) :]

    def finish(self, hypothesis: list[Word], whole: bool = False) -> None:
        """The final hypothesis for the rest of the audio (``whole``: for all of it, replacing
        what was committed): commit all of it."""
        self.committed = [*([] if whole else self.committed), *hypothesis]
        self._previous = []


def drop_repeats(words: list[Word], max_repeats: int = 2, longest: int = 6) -> list[Word]:
    """Cut a phrase repeated more than ``max_repeats`` times in a row down to one occurrence.

    Whisper on a short or noisy window can loop ("that that that that ..."); people do not
    say the same phrase three times running.
    """
    keys = [normalize_word(w.text) for w in words]
    kept: list[Word] = []
    i = 0
    while i < len(words):
        loop = _repeated_phrase(keys, i, max_repeats, longest)
        if loop is None:
            kept.append(words[i])
            i += 1
        else:
            length, repeats = loop
            kept.extend(words[i : i + length])
            i += length * repeats
    return kept


def _repeated_phrase(
    keys: list[str], i: int, max_repeats: int, longest: int
) -> tuple[int, int] | None:
    """(phrase length, repeat count) of the shortest phrase at ``i`` repeated too often."""
    for length in range(1, longest + 1):
        phrase = keys[i : i + length]
        if len(phrase) < length:
            return None
        repeats = 1
        while keys[i + repeats * length : i + (repeats + 1) * length] == phrase:
            repeats += 1
        if repeats > max_repeats:
            return length, repeats
    return None


def trim_echo(
    prefix: list[Word] | tuple[Word, ...], words: list[Word], longest: int = 3
) -> list[Word]:
    """Drop what a decoder says again after a forced prefix.

    Two failure modes at the seam: the last prefix word(s) spoken again ("logged | logged on"),
    and the decoder starting the sentence over once the audio runs out ("please enter your
    agent number | please enter your ..."). A three-word phrase that already occurred is a
    restart, not speech, so the hypothesis is cut there.
    """
    before = [normalize_word(w.text) for w in prefix]
    keys = [normalize_word(w.text) for w in words]
    for n in range(min(longest, len(before), len(keys)), 0, -1):
        if keys[:n] == before[-n:]:
            words, keys = words[n:], keys[n:]
            break
    seen = before[:]
    for i in range(len(keys)):
        gram = keys[i : i + 3]
        if len(gram) == 3 and any(seen[j : j + 3] == gram for j in range(len(seen) - 2)):
            return words[:i]
        seen.append(keys[i])
    return words
