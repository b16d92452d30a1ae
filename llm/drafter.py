"""The fast drafter: the first few words of the reply, cut at a natural break.

The prefix is spoken before the slow model has read the question, so it must be safe to
commit: an acknowledgement and the start of an answer, never a fact that might have to be
taken back. The prompt asks for that; the verifier checks it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

from llm.backend import Backend, Message, Token
from llm.relay import Draft
from voice.settings import LlmSettings

DRAFT_INSTRUCTION = (
    " Start every reply with a short, natural opener that fits what the user said, such as "
    "an acknowledgement, before any facts."
)
_BREAK = re.compile(r"[,.!?;:]")
_WORD = re.compile(r"\S+")
# A full stop after these ends no clause ("The U.S. team", "Dr. Smith").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc"})


def _ends_clause(word: str, mark: re.Match[str]) -> bool:
    before = word[: mark.start()].strip("\"'(")
    if not before:
        return False
    if mark.group() != ".":
        return True
    initial = before.rsplit(".", 1)[-1]
    return not (len(initial) == 1 and initial.isalpha()) and before.lower() not in _ABBREVIATIONS


def natural_break(text: str, min_words: int, max_words: int) -> int | None:
    """Where a prefix of ``text`` may end: just after the first punctuation mark that ends a
    clause, from the ``min_words``-th word on (an initial's or a title's full stop does not),
    or after ``max_words`` words once the next one has begun. None: not yet."""
    words = list(_WORD.finditer(text))
    for word in words[min_words - 1 : max_words]:
        for mark in _BREAK.finditer(word.group()):
            if _ends_clause(word.group(), mark):
                return word.start() + mark.end()
    if len(words) > max_words:
        return words[max_words - 1].end()
    return None


class LlamaDrafter:
    def __init__(self, backend: Backend, settings: LlmSettings) -> None:
        self._backend = backend
        self._settings = settings

    def messages(self, history: Sequence[Message], transcript: str) -> list[Message]:
        system, *turns = history
        return [
            Message(role="system", content=system.content + DRAFT_INSTRUCTION),
            *turns[-2 * self._settings.draft_history_turns :],
            Message(role="user", content=transcript),
        ]

    async def prefill(self, history: Sequence[Message], transcript: str = "") -> None:
        """Evaluate the drafter's prompt: its view of the history, and the user's words so
        far when there are any."""
        messages = self.messages(history, transcript)
        await self._backend.prefill(messages if transcript else messages[:-1])

    async def draft(self, history: Sequence[Message], transcript: str) -> Draft:
        text, tokens = "", []
        stream = self._backend.stream(
            self.messages(history, transcript), max_tokens=self._settings.draft_max_tokens
        )
        async for token in stream:
            tokens.append(token)
            text += token.text
            cut = natural_break(
                text.lstrip(), self._settings.draft_min_words, self._settings.draft_max_words
            )
            if cut is not None:
                text = text.lstrip()[:cut]
                break
        return Draft(transcript=transcript, text=text.strip(), tokens=tuple(tokens))

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[Token]:
        return self._backend.stream(messages, max_tokens=self._settings.max_reply_tokens)
