"""The relay on the real models: SmolLM2 drafts, the verifier decides, Qwen 1.5B continues."""

import asyncio
import itertools

import pytest

from llm.models import LlmModels
from voice.clock import RealClock
from voice.events import (
    ResponseDone,
    ResponseTextDelta,
    StageError,
    TurnEnded,
    TurnMaybeEnded,
    TurnTranscript,
)
from voice.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models() -> LlmModels:
    models = LlmModels(Settings.load(env={}))
    yield models
    models.close()


def answer(models, transcript, mode="relay", max_tokens=80, speculate=False) -> list:
    """The events of one turn answered live by a fresh relay."""
    events = []

    async def main():
        relay = models.relay(RealClock(), events.append, mode=mode)
        if speculate:
            relay.on_event(TurnMaybeEnded(t=0, transcript=transcript, p_complete=0.9))
        relay.on_event(TurnEnded(t=0, transcript=transcript, reason="test"))
        relay.on_event(TurnTranscript(t=0, transcript=transcript))
        await relay.wait()

    models.settings.llm.max_reply_tokens = max_tokens
    try:
        asyncio.run(main())
    finally:
        models.settings.llm.max_reply_tokens = 80
    assert not [e for e in events if isinstance(e, StageError)]
    return events


@pytest.mark.parametrize("mode", ["relay", "cascaded"])
def test_answers_one_turn_as_one_seamless_reply(models, mode):
    events = answer(models, "Do you like football?", mode=mode)
    deltas = [e for e in events if isinstance(e, ResponseTextDelta)]
    (done,) = [e for e in events if isinstance(e, ResponseDone)]
    assert done.text and done.text == "".join(d.text for d in deltas).strip()
    words = done.text.lower().split()
    assert all(a != b for a, b in itertools.pairwise(words)), done.text  # no seam echo
    if mode == "cascaded":
        assert {d.source for d in deltas} == {"full"}
    elif deltas[0].source == "prefix":
        assert {d.source for d in deltas[1:]} <= {"continuation"}


@pytest.mark.parametrize(
    "transcript",
    ["", "word " * 2000 + "what do you think?", "¿Dónde está la biblioteca? 图书馆在哪里"],
    ids=["empty", "2000-words", "not-english"],
)
def test_odd_transcripts_get_one_complete_reply_and_no_error(models, transcript):
    events = answer(models, transcript, max_tokens=12, speculate=True)
    assert len([e for e in events if isinstance(e, ResponseDone)]) == 1
