"""Scripted stand-ins for the models, for tests on a virtual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from llm.backend import BackendError, Message, Token
from llm.relay import Draft
from voice.clock import VirtualClock


def tok(text: str) -> Token:
    return Token(text=text, logprob=-0.1, entropy=0.5, margin=2.0)


class ScriptedModel:
    """Streams scripted pieces, one every ``step`` seconds of virtual time."""

    def __init__(
        self, clock: VirtualClock, pieces: list[str], step: float = 0.04, fail_at: int | None = None
    ) -> None:
        self.clock, self.pieces, self.step, self.fail_at = clock, pieces, step, fail_at
        self.calls: list[tuple[list[Message], str]] = []
        self.prefills = 0
        self.drafts: list[str] = []

    async def prefill(self, messages: Sequence[Message]) -> None:
        self.prefills += 1

    async def stream(
        self, messages: Sequence[Message], assistant_prefix: str = "", max_tokens: int = 64
    ) -> AsyncIterator[Token]:
        self.calls.append((list(messages), assistant_prefix))
        for i, piece in enumerate(self.pieces):
            await self.clock.sleep(self.step)
            if i == self.fail_at:
                raise BackendError("server went away")
            yield tok(piece)

    async def draft(self, history: Sequence[Message], transcript: str) -> Draft:
        self.drafts.append(transcript)
        await self.clock.sleep(0.1)
        return Draft(transcript=transcript, text="Yes, I love", tokens=(tok("Yes"),))


class Verdict:
    def __init__(self, accept: bool) -> None:
        self.value = accept

    def accept(self, history: Sequence[Message], draft: Draft) -> bool:
        return self.value
