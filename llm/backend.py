"""Language-model backends behind one small interface.

A backend streams the assistant's reply token by token, each with the signals a verifier
needs (log-probability of the chosen token, entropy of the whole next-token distribution, and
the top-1/top-2 margin). It can continue a reply that is already partly written (the committed
prefix) and pre-fill a prompt's KV cache while the user is still speaking. Closing the stream
cancels generation within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import mmap
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llm.llama import load_llama
from llm.prompt_cache import PromptCache, SavedPrompt, shared_prefix
from llm.worker import ModelWorker, Priority
from voice.cpu import CpuGate

Role = Literal["system", "user", "assistant"]
PREFILL_SLICE = 32  # prompt tokens evaluated at once in a pre-fill (~0.1-0.2 s on 2 cores)
KEEP_MIN_TOKENS = 64  # the prompt in the context is saved when a request would overwrite this many
# Replies on one model take turns of this many tokens (~0.8 s of compute, ~2.5 s of speech)
# rather than wait for whole replies; a new reply's first words go first.
QUANTUM_TOKENS = 8


class BackendError(RuntimeError):
    """The model could not produce a reply (crashed, timed out, unreachable)."""


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    logprob: float  # of the chosen token
    entropy: float  # of the next-token distribution, nats
    margin: float  # log-probability of the best token minus the second best


class Backend(Protocol):
    name: str

    async def prefill(self, messages: Sequence[Message], assistant_prefix: str = "") -> None:
        """Evaluate the prompt for ``messages`` (and the start of the reply, when it is known)
        now, so that a reply to it starts sooner."""
        ...

    def stream(
        self, messages: Sequence[Message], assistant_prefix: str = "", max_tokens: int = 64
    ) -> AsyncIterator[Token]:
        """The reply to ``messages``, continuing ``assistant_prefix`` when one is given."""
        ...


def token_signals(logits: np.ndarray, token: int) -> tuple[float, float, float]:
    """(log-probability of ``token``, entropy, top-1/top-2 margin) from raw logits."""
    shifted = logits - logits.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    top2 = np.partition(log_probs, -2)[-2:]
    entropy = float(-(np.exp(log_probs) * log_probs).sum())
    return float(log_probs[token]), entropy, float(top2[1] - top2[0])


class LlamaBackend:
    """A GGUF model in-process through llama-cpp-python; greedy decoding on one worker thread.

    One llama.cpp context serves one request at a time, so requests queue on the worker,
    replies before pre-fills (llm.worker). A new prompt that shares a prefix with the one in the
    context only evaluates the new tokens; the prompts of other conversations the context
    turned away from are kept (llm.prompt_cache), so coming back to one costs milliseconds.
    """

    def __init__(
        self,
        name: str,
        model_file: Path,
        threads: int,
        context_tokens: int,
        gate: CpuGate | None = None,
        prompt_cache_mb: int = 0,
    ) -> None:
        self.name = name
        self._gate = gate  # when given, generation steps aside for urgent work between tokens
        self._llm = load_llama(model_file, threads, context_tokens)
        self._formatter = Jinja2ChatFormatter(
            self._llm.metadata["tokenizer.chat_template"], eos_token="", bos_token=""
        )
        end_of_turn = self._llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
        self._end_tokens = {self._llm.token_eos(), *(end_of_turn if len(end_of_turn) == 1 else ())}
        self._worker = ModelWorker(f"llm-{name}")
        self._context = context_tokens
        self.prompt_cache = PromptCache(prompt_cache_mb * 1024 * 1024, KEEP_MIN_TOKENS)

    def prompt_tokens(
        self, messages: Sequence[Message], assistant_prefix: str, reserve: int
    ) -> list[int]:
        """The chat-formatted prompt, oldest turns dropped (and, if need be, the start of the
        last message cut) so that it leaves ``reserve`` tokens of room in the context."""
        budget = self._context - reserve
        messages = list(messages)
        while True:
            text = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in messages]
            ).prompt
            tokens = self._llm.tokenize((text + assistant_prefix).encode(), False, True)
            if len(tokens) <= budget:
                return tokens
            droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
            if droppable:
                del messages[droppable[0]]
                continue
            last = messages[-1]
            words = last.content.split()
            if len(words) <= 1:
                raise BackendError(f"prompt does not fit in {self._context} tokens")
            messages[-1] = Message(role=last.role, content=" ".join(words[len(words) // 4 :]))

    async def prefill(self, messages: Sequence[Message], assistant_prefix: str = "") -> None:
        tokens = self.prompt_tokens(messages, assistant_prefix, reserve=256)
        await self._worker.run(Priority.READ_AHEAD, lambda: self._evaluate(tokens))

    def _evaluate(self, tokens: list[int]) -> None:
        """Evaluate the prompt after its cached prefix, in slices: between two, urgent work
        (the gate) goes first, so a long pre-fill never starves the voice."""
        self._recall(tokens)
        reuse = min(Llama.longest_token_prefix(self._llm._input_ids, tokens), len(tokens) - 1)
        self._llm.n_tokens = reuse  # eval() drops the cache after this point
        for start in range(reuse, len(tokens), PREFILL_SLICE):
            if self._gate is not None:
                self._gate.wait_clear()
            self._llm.eval(tokens[start : start + PREFILL_SLICE])

    def single_tokens(self, words: Sequence[str]) -> frozenset[int]:
        """The tokens that spell one of ``words`` alone (as written, capitalised, after a
        space or not); spellings split over several tokens are left out."""
        spellings = {
            f"{space}{case(w)}"
            for w in words
            for space in ("", " ")
            for case in (str.lower, str.capitalize)
        }
        ids = [self._llm.tokenize(s.encode(), add_bos=False, special=False) for s in spellings]
        return frozenset(t[0] for t in ids if len(t) == 1)

    async def stream(
        self,
        messages: Sequence[Message],
        assistant_prefix: str = "",
        max_tokens: int = 64,
        avoid: frozenset[int] = frozenset(),
    ) -> AsyncIterator[Token]:
        """As ``Backend.stream``; the model never picks a token in ``avoid`` (its signals are
        still those of the unmasked distribution, so the verifier sees the detour)."""
        prompt = self.prompt_tokens(messages, assistant_prefix, reserve=max_tokens + 8)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()
        generated: list[int] = []  # kept between turns on the model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def put(item: Token | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> bool:
            try:
                return self._generate(prompt, generated, max_tokens, cancelled, decoder, put, avoid)
            except Exception as exc:
                put(BackendError(f"{self.name}: {exc}"))
                return True

        async def produce() -> None:
            priority = Priority.REPLY
            while not await self._worker.run(priority, work):
                priority = Priority.CONTINUATION  # after new replies, in turn with the others
            put(None)

        running = asyncio.create_task(produce())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()  # stops generation within one token
            running.cancel()  # leaves the queue, if it was waiting its turn
            await asyncio.gather(running, return_exceptions=True)

    def _generate(
        self,
        prompt: list[int],
        generated: list[int],
        max_tokens: int,
        cancelled: threading.Event,
        decoder: codecs.IncrementalDecoder,
        put: Callable[[Token], None],
        avoid: frozenset[int] = frozenset(),
    ) -> bool:
        """Generate on from ``generated``. False: it stopped early to let another reply have
        the model, and goes on at its next turn. A reply's first ``QUANTUM_TOKENS`` are never
        cut; after them it gives way at once to a new reply's first words, and to another
        reply's rest after ``QUANTUM_TOKENS`` more."""
        tokens = prompt + generated
        self._recall(tokens)
        masked = list(avoid)

        def mask(_: object, logits: np.ndarray) -> np.ndarray:
            logits[masked] = -np.inf
            return logits

        steps = self._llm.generate(
            tokens, top_k=1, temp=0.0, reset=True, logits_processor=[mask] if masked else None
        )
        for count, token in enumerate(steps):
            if cancelled.is_set() or token in self._end_tokens or len(generated) >= max_tokens:
                return True
            generated.append(token)
            logprob, entropy, margin = token_signals(self._last_logits(), token)
            text = decoder.decode(self._llm.detokenize([token]))
            put(Token(text=text, logprob=logprob, entropy=entropy, margin=margin))
            if QUANTUM_TOKENS <= len(generated) < max_tokens and self._worker.waiting(
                Priority.REPLY if count + 1 < QUANTUM_TOKENS else Priority.CONTINUATION
            ):  # saved as it is, so that it goes on exactly as it would have
                live = self._llm.input_ids[: self._llm.n_tokens].tolist()
                self.prompt_cache.put(live, self._save_state())
                return False
            if self._gate is not None:  # before the next token is computed
                self._gate.wait_clear()
        return True

    async def score(
        self, messages: Sequence[Message], text: str, assistant_prefix: str = ""
    ) -> list[Token]:
        """Teacher-forced: the signals each token of ``text`` would have had as a reply."""
        prompt = self.prompt_tokens(messages, assistant_prefix, reserve=64)
        forced = self._llm.tokenize(text.encode(), add_bos=False, special=False)
        return await self._worker.run(Priority.REPLY, lambda: self._score(prompt, forced))

    def _score(self, prompt: list[int], forced: list[int]) -> list[Token]:
        self._recall(prompt)
        reuse = min(Llama.longest_token_prefix(self._llm._input_ids, prompt), len(prompt) - 1)
        self._llm.n_tokens = reuse  # eval() drops the cache after this point
        self._llm.eval(prompt[reuse:])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = []
        for token in forced:
            logprob, entropy, margin = token_signals(self._last_logits(), token)
            text = decoder.decode(self._llm.detokenize([token]))
            tokens.append(Token(text=text, logprob=logprob, entropy=entropy, margin=margin))
            self._llm.eval([token])
        return tokens

    def _recall(self, tokens: list[int]) -> None:
        """Before reading ``tokens``: save the prompt in the context if they would overwrite
        much of it (another conversation's), and restore a saved prompt that shares more."""
        live = self._llm.input_ids[: self._llm.n_tokens].tolist()
        shared = shared_prefix(live, tokens)
        if len(live) - shared >= KEEP_MIN_TOKENS and not self.prompt_cache.refresh(live):
            self.prompt_cache.put(live, self._save_state())
        found = self.prompt_cache.best(tokens)
        if found is not None and found[1] > shared:
            self._load_state(found[0])

    def _save_state(self) -> mmap.mmap:
        """The context's KV state, in memory of its own: unlike the heap, freed pages go back
        to the system at once (tens of MB come and go as conversations switch)."""
        ctx = self._llm._ctx.ctx
        state = mmap.mmap(-1, llama_cpp.llama_state_seq_get_size(ctx, 0))
        buffer = (ctypes.c_uint8 * len(state)).from_buffer(state)  # written in place: no copy
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, len(state), 0)
        del buffer
        if written != len(state):
            state.resize(written)
        return state

    def _load_state(self, saved: SavedPrompt) -> None:
        source = (ctypes.c_uint8 * len(saved.state)).from_buffer(saved.state)
        if llama_cpp.llama_state_seq_set_data(self._llm._ctx.ctx, source, len(saved.state), 0) == 0:
            self._llm.n_tokens = 0  # the context is cleared: the prompt is read again
            raise BackendError(f"{self.name}: a saved prompt could not be restored")
        self._llm.input_ids[: len(saved.tokens)] = saved.tokens
        self._llm.n_tokens = len(saved.tokens)
        self._llm._requires_eval = True  # the logits are not this prompt's

    def _last_logits(self) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),))

    def close(self) -> None:
        self._worker.close()
        self._llm.close()
