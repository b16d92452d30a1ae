"""Reply text for a voice: what can be said aloud, and where a streamed reply is cut.

An LLM streams its reply a token at a time, but a voice needs whole phrases: too short and the
prosody is flat, too long and the listener waits. ``Chunker`` cuts a reply's first chunk as
soon as possible (first audio is what the user waits for) and later chunks at clause or
sentence boundaries, never inside a word.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Unicode categories a voice cannot say: symbols other than math and currency (emoji, ©, °),
# modifier symbols, format characters (zero-width joiners), private use, unassigned.
_UNSAID_CATEGORIES = frozenset({"So", "Sk", "Cf", "Co", "Cs", "Cn"})
_UNSAID_MARKS = frozenset({0x20E3, *range(0xFE00, 0xFE10)})  # keycap, variation selectors
# Emphasis, headings, code and strike-through marks; an underscore inside snake_case is read as
# a space, which is how a person would say it.
_MARKDOWN = re.compile(r"[*#`~_]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([,;:.!?])")  # left where an emoji was removed

_TOKEN = re.compile(r"\S+")
_CLOSERS = "\"'”’)]"
# A clause or sentence ends after the token (when whitespace follows it).
_CLAUSE_END = re.compile(rf"(?:[,;:.!?…]+|[-—–]+)[{re.escape(_CLOSERS)}]*$")
# A letter then , ; ! ? or a dash cannot go on as a word or a number ("1,000", "3.5", "e.g."
# can), so it ends a clause even before the next token arrives.
_EARLY_END = re.compile(r"[^\W\d_][,;!?—–]$")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "jr.", "sr.", "prof."})


def speakable(text: str) -> str:
    """``text`` as a voice should read it: no markdown symbols, emoji or other unsayable
    characters, whitespace collapsed. Empty when nothing in it can be said."""
    text = _MARKDOWN.sub(" ", text)
    kept = "".join(
        " " if unicodedata.category(ch) == "Cc" else ch
        for ch in text
        if unicodedata.category(ch) not in _UNSAID_CATEGORIES and ord(ch) not in _UNSAID_MARKS
    )
    kept = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(kept.split()))
    return kept if any(ch.isalnum() for ch in kept) else ""


def spoken_length(token: str) -> int:
    """Letters and digits a voice says for one whitespace-separated token (0: nothing)."""
    return sum(ch.isalnum() for ch in speakable(token))


def _ends_clause(token: str) -> bool:
    if not _CLAUSE_END.search(token):
        return False
    bare = token.strip(_CLOSERS + "(").lower()
    return bare not in _ABBREVIATIONS and not _INITIALS.fullmatch(bare)


@dataclass(frozen=True)
class _Gap:
    """A place between two tokens where the buffer may be cut."""

    end: int  # buffer position just after the token
    words: int  # words from the buffer's start up to here
    boundary: bool  # a clause or sentence ends here


class Chunker:
    """Cuts one reply's streamed text into chunks to synthesise, in order.

    The first chunk ends at the first clause boundary or after ``first_words`` complete words,
    whichever comes first. Later chunks end at the first clause or sentence boundary that
    leaves at least ``min_words`` words in them, so each is a natural phrase. No chunk is
    longer than ``max_words``: a run-on reply is cut at its last boundary in the second half
    of that span, else at a space.
    """

    def __init__(self, first_words: int, min_words: int, max_words: int) -> None:
        if not (1 <= first_words <= max_words and 1 <= min_words <= max_words):
            raise ValueError(
                f"chunk sizes must satisfy 1 <= first_chunk_words, chunk_min_words <= "
                f"chunk_max_words; got {first_words}, {min_words}, {max_words}"
            )
        self._first_words = first_words
        self._min_words = min_words
        self._max_words = max_words
        self._buffer = ""
        self._started = False  # a chunk of streamed (not phrase) text has been cut

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the chunks it completes."""
        self._buffer += text
        return self._cut_all(final=False)

    def phrase(self, text: str) -> list[str]:
        """A complete phrase (the relay's prefix) said as its own chunk, split only by the
        length cap. Text still pending goes out before it."""
        chunks = self.flush()
        self._buffer = text
        while (cut := self._cap(self._gaps(final=True))) is not None:
            chunks.append(self._take(cut))
        chunks.append(self._take(len(self._buffer)))
        return [c for c in chunks if c]

    def flush(self) -> list[str]:
        """The end of the reply: everything still pending, in chunks."""
        chunks = self._cut_all(final=True)
        chunks.append(self._take(len(self._buffer)))
        return [c for c in chunks if c]

    def _cut_all(self, final: bool) -> list[str]:
        chunks = []
        while (cut := self._cut(final)) is not None:
            chunks.append(self._take(cut))
            self._started = True
        return [c for c in chunks if c]

    def _take(self, end: int) -> str:
        chunk, self._buffer = self._buffer[:end].strip(), self._buffer[end:]
        return chunk

    def _gaps(self, final: bool) -> list[_Gap]:
        """Cut points after each complete token: one followed by whitespace (or by the end of
        the reply), or one that ends a clause in a way no further text could change."""
        gaps, words = [], 0
        for match in _TOKEN.finditer(self._buffer):
            token = match.group()
            words += any(ch.isalnum() for ch in token)
            if final or match.end() < len(self._buffer):
                gaps.append(_Gap(match.end(), words, _ends_clause(token)))
            elif _EARLY_END.search(token):
                gaps.append(_Gap(match.end(), words, boundary=True))
            if words > self._max_words:
                break  # no cut lies past the cap
        return gaps

    def _cut(self, final: bool) -> int | None:
        gaps = self._gaps(final)
        least = 1 if not self._started else self._min_words
        for gap in gaps:
            if gap.boundary and gap.words >= least:
                return gap.end
            if not self._started and gap.words >= self._first_words:
                return gap.end
        return self._cap(gaps)

    def _cap(self, gaps: list[_Gap]) -> int | None:
        limit = next((g for g in gaps if g.words >= self._max_words), None)
        if limit is None or limit.end >= len(self._buffer.rstrip()):
            return None  # within the cap (a last token that reaches it is the whole rest)
        half = self._max_words // 2
        boundaries = [g.end for g in gaps if g.boundary and half <= g.words <= self._max_words]
        return boundaries[-1] if boundaries else limit.end
