"""The embedded llama.cpp backend on the real draft model (SmolLM2-135M)."""

import asyncio

import numpy as np
import pytest

from llm.backend import QUANTUM_TOKENS, LlamaBackend, Message, token_signals
from voice.models import resolve
from voice.settings import Settings

QUESTION = [
    Message(role="system", content="You are a friendly voice assistant. Reply briefly."),
    Message(role="user", content="Do you like football?"),
]


def test_token_signals_from_logits():
    logprob, entropy, margin = token_signals(np.log(np.array([0.5, 0.25, 0.25])), 1)
    assert logprob == pytest.approx(np.log(0.25))
    assert entropy == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
    assert margin == pytest.approx(np.log(2))


@pytest.fixture(scope="module")
def backend() -> LlamaBackend:
    settings = Settings.load(env={})
    backend = LlamaBackend(
        "draft", resolve("draft-llm", settings).path, 1, 1024, prompt_cache_mb=64
    )
    yield backend
    backend.close()


async def collect(backend: LlamaBackend, messages, prefix="", limit=24, stop_after=None):
    tokens = []
    async for token in backend.stream(messages, prefix, limit):
        tokens.append(token)
        if stop_after is not None and len(tokens) == stop_after:
            break
    return tokens


@pytest.mark.integration
def test_streams_a_reply_with_verifier_signals(backend):
    tokens = asyncio.run(collect(backend, QUESTION))
    assert 0 < len(tokens) <= 24 and "".join(t.text for t in tokens).strip()
    assert all(t.logprob <= 0 and t.entropy >= 0 and t.margin >= 0 for t in tokens)


@pytest.mark.integration
def test_continues_a_committed_prefix_without_repeating_it(backend):
    async def main():
        await backend.prefill(QUESTION)
        return await collect(backend, QUESTION, prefix="Yes, I love", limit=12)

    text = "".join(t.text for t in asyncio.run(main()))
    assert text and not text.strip().lower().startswith("yes, i love")


@pytest.mark.integration
def test_reading_the_opening_ahead_leaves_the_continuation_unchanged(backend):
    async def main():
        plain = await collect(backend, QUESTION, prefix="Yes, I love", limit=8)
        await backend.prefill(QUESTION[:1])  # something else in the cache in between
        await backend.prefill(QUESTION, "Yes, I love")
        read_ahead = await collect(backend, QUESTION, prefix="Yes, I love", limit=8)
        return plain, read_ahead

    plain, read_ahead = asyncio.run(main())
    assert [t.text for t in read_ahead] == [t.text for t in plain]


@pytest.mark.integration
def test_closing_the_stream_cancels_and_the_backend_stays_usable(backend):
    async def main():
        first = await collect(backend, QUESTION, limit=200, stop_after=2)
        second = await collect(backend, QUESTION, limit=5)
        return first, second

    first, second = asyncio.run(main())
    assert len(first) == 2 and 0 < len(second) <= 5


@pytest.mark.integration
def test_a_transcript_too_long_for_the_context_is_cut_from_the_start(backend):
    long = [Message(role="user", content="word " * 3000 + "What is your name?")]
    assert len(asyncio.run(collect(backend, long, limit=4))) <= 4  # runs; no context overflow
    assert len(backend.prompt_tokens(long, "", reserve=64)) <= 1024 - 64


@pytest.mark.integration
def test_teacher_forced_scores_match_what_generation_saw(backend):
    async def main():
        generated = await collect(backend, QUESTION, limit=6)
        text = "".join(t.text for t in generated)
        return generated, await backend.score(QUESTION, text)

    generated, scored = asyncio.run(main())
    assert [t.text for t in scored] == [t.text for t in generated]
    for g, s in zip(generated, scored, strict=True):
        assert s.logprob == pytest.approx(g.logprob, abs=0.05)
        assert s.entropy == pytest.approx(g.entropy, abs=0.05)


@pytest.mark.integration
def test_coming_back_to_a_conversation_restores_its_prompt_instead_of_reading_it(backend):
    """One context serves two conversations in turn: the first's prompt is saved when the
    second overwrites it, and restored (not read again) when the first speaks next."""
    topic = "We talked about football, the World Cup, and who scored the most goals. " * 6
    first = [Message(role="system", content=topic), Message(role="user", content="And you?")]
    second = [Message(role="system", content="Cats sleep a lot. " * 30), *first[1:]]
    evaluated: list[int] = []
    evaluate = backend._llm.eval

    def counting_eval(tokens):
        evaluated.append(len(tokens))
        return evaluate(tokens)

    async def main():
        await backend.prefill(first)
        plain = await collect(backend, first, limit=6)
        await backend.prefill(second)  # overwrites the first conversation's prompt
        backend._llm.eval = counting_eval
        try:
            restored = await collect(backend, first, limit=6)
        finally:
            backend._llm.eval = evaluate
        return plain, restored

    plain, restored = asyncio.run(main())
    prompt = len(backend.prompt_tokens(first, "", reserve=14))
    assert prompt > 100 and sum(evaluated) < 16  # its last token and the reply's, not the prompt
    assert [t.text for t in restored] == [t.text for t in plain]


@pytest.mark.integration
def test_two_replies_take_turns_on_the_model_and_each_is_unchanged(backend):
    """A second conversation's reply does not wait for the whole of the first: they take
    turns every few tokens, and each comes out as it would alone."""
    other = [QUESTION[0], Message(role="user", content="Tell me about the moon landing.")]

    async def alone(messages):
        return [t.text for t in await collect(backend, messages, limit=40)]

    async def together(start_second_after: int):
        arrivals: list[str] = []

        async def reply(name, messages):
            texts = []
            async for token in backend.stream(messages, "", 40):
                arrivals.append(name)
                texts.append(token.text)
            return texts

        first = asyncio.create_task(reply("first", QUESTION))
        while len(arrivals) < start_second_after:
            await asyncio.sleep(0.001)
        second = await reply("second", other)
        return await first, second, arrivals

    async def main():
        return (
            await alone(QUESTION),
            await alone(other),
            await together(1),
            await together(QUANTUM_TOKENS + 2),
        )

    first_alone, second_alone, in_first_words, later = asyncio.run(main())
    assert len(first_alone) > 3 * QUANTUM_TOKENS  # long enough to be cut in turns
    for first, second, arrivals in (in_first_words, later):
        assert first == first_alone and second == second_alone
        assert arrivals.index("second") < len(arrivals) - arrivals[::-1].index("first") - 1
    # The first reply's first words are not cut; past them, it gives way at once.
    assert in_first_words[2].index("second") >= QUANTUM_TOKENS
    assert later[2].index("second") <= QUANTUM_TOKENS + 2 + QUANTUM_TOKENS // 2


@pytest.mark.integration
def test_words_to_avoid_are_never_written(backend):
    sad = [QUESTION[0], Message(role="user", content="My dog died yesterday.")]
    avoid = backend.single_tokens(["sorry"])

    async def reply(**kw):
        return "".join([t.text async for t in backend.stream(sad, "", 16, **kw)]).lower()

    assert "sorry" in asyncio.run(reply())  # what it says when free to
    assert len(avoid) >= 2 and "sorry" not in asyncio.run(reply(avoid=avoid))
