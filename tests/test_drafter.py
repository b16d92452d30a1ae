"""Where a draft prefix may end, and the real drafter on the real SmolLM2."""

import asyncio

import pytest

from llm.backend import LlamaBackend, Message
from llm.drafter import LlamaDrafter, natural_break
from voice.models import resolve
from voice.settings import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, I do", None),  # a mark on the first word is too soon: wait
        ("Yes, I do.", "Yes, I do."),
        ("I see, nice", "I see,"),
        ("No. There were no other left", "No. There were no other"),
        ('"Oh no, nice', '"Oh no,'),
        ("Well I think that is a great", "Well I think that is"),
        ("I love watching football with", None),  # five words: wait for the sixth or a mark
        ("...", None),  # a mark with no word before it is no break
        ("The S. U. S. Presidents were", "The S. U. S. Presidents"),  # initials end no clause
        ("The U.S. team won.", "The U.S. team won."),
        ("Yes, Dr. Smith did it well", "Yes, Dr. Smith did it"),
        ("Oh no. That", "Oh no."),
        ("", None),
    ],
)
def test_natural_break(text, expected):
    cut = natural_break(text, 2, 5)
    assert (text[:cut] if cut is not None else None) == expected


@pytest.mark.integration
def test_real_drafter_writes_a_short_prefix():
    settings = Settings.load(env={})
    backend = LlamaBackend("draft", resolve("draft-llm", settings).path, 1, 1024)
    drafter = LlamaDrafter(backend, settings.llm)
    history = [Message(role="system", content=settings.llm.system_prompt)]

    async def draft_twice() -> tuple[str, str]:
        first = await drafter.draft(history, "Do you like football?")
        await drafter.prefill(history, "Do you like")  # read while the user was speaking
        second = await drafter.draft(history, "Do you like football?")
        return first.text, second.text

    try:
        draft = asyncio.run(drafter.draft(history, "Do you like football?"))
        fresh, after_reading = asyncio.run(draft_twice())
    finally:
        backend.close()
    assert 2 <= len(draft.text.split()) <= settings.llm.draft_max_words
    assert draft.tokens and draft.transcript == "Do you like football?"
    assert after_reading == fresh == draft.text  # the words read ahead change nothing
