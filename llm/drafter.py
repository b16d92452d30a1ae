"""The fast drafter: the first few words of the reply, cut at a natural break.

The prefix is spoken before the slow model has read the question, so it must be safe to
commit: an acknowledgement and the start of an answer, never a fact that might have to be
taken back. The prompt asks for that; the verifier checks it. An apology is never safe: the
slow model goes on from "I'm sorry," with "but I can't assist with that." (on valid_freq,
35 of 56 apology drafts; those replies scored 2.0 against 4.5 for the slow model alone), and
SmolLM2 opens a fifth of its drafts with one whatever the prompt says, so the drafter cannot
write those words at all.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

from llm.backend import Backend, LlamaBackend, Message, Token
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


_APOLOGIES = ("sorry", "apologize", "apologise", "apologies")


class LlamaDrafter:
    def __init__(self, backend: Backend, settings: LlmSettings) -> None:
        self._backend = backend
        self._settings = settings
        # Masking needs the model's own logits; a drafter on a server may still apologise,
        # and the verifier, trained on such drafts, rejects those.
        self._apologies = (
            backend.single_tokens(_APOLOGIES) if isinstance(backend, LlamaBackend) else frozenset()
        )

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
        messages = self.messages(history, transcript)
        limit = self._settings.draft_max_tokens
        stream = (
            self._backend.stream(messages, max_tokens=limit, avoid=self._apologies)
            if isinstance(self._backend, LlamaBackend)
            else self._backend.stream(messages, max_tokens=limit)
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
