"""The dual-path speculative responder (RelayS2S): a fast draft, a verifier, a slow continuation.

On ``TurnMaybeEnded`` the drafter speculatively writes the first few words of the reply from
the transcript so far, the verifier scores them (``DraftReady`` announces an accepted draft, so
the voice can synthesise it early), and the slow model pre-fills its prompt. ``TurnResumed``
throws that away. On ``TurnEnded`` the verified draft (the speculative one when the transcript
has not changed) goes out at once as the ``prefix``, and the slow model
continues the reply from it (assistant pre-fill) once the final transcript is known; rejected,
the slow model answers alone (``full``). Mode ``cascaded`` is the slow model alone and mode
``fast`` the drafter alone, for comparison.

Every reply ends with exactly one ``ResponseDone``; a backend that fails, stalls or raises
ends the reply early with a ``StageError`` saying why (``reply_failed``), and the conversation
goes on. A reply that failed before it said anything says ``llm.apology`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Protocol

from llm.backend import BackendError, Message, Token
from voice.clock import Clock, wait_for
from voice.cpu import CpuGate
from voice.events import (
    DraftReady,
    Event,
    Metric,
    ResponseDone,
    ResponseSource,
    ResponseTextDelta,
    SpeechStarted,
    StageError,
    TurnEnded,
    TurnMaybeEnded,
    TurnResumed,
    TurnTranscript,
    TurnWords,
)
from voice.settings import LlmSettings, RelayMode

Emit = Callable[[Event], None]


@dataclass(frozen=True)
class Draft:
    transcript: str  # what the user had said when it was drafted
    text: str  # the prefix, ending at a natural break
    tokens: tuple[Token, ...]


class Drafter(Protocol):
    async def prefill(self, history: Sequence[Message], transcript: str = "") -> None:
        """Evaluate the drafting prompt for ``history`` and the user's words so far."""
        ...

    async def draft(self, history: Sequence[Message], transcript: str) -> Draft: ...

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[Token]:
        """A whole reply from the fast model (mode ``fast``)."""
        ...


class Verifier(Protocol):
    async def read(self, history: Sequence[Message], transcript: str) -> None:
        """Take in the user's words ahead of a draft for them (the draft is then judged sooner)."""
        ...

    async def accept(self, history: Sequence[Message], draft: Draft) -> bool: ...


class Continuer(Protocol):
    async def prefill(self, messages: Sequence[Message], assistant_prefix: str = "") -> None: ...

    def stream(
        self, messages: Sequence[Message], assistant_prefix: str = "", max_tokens: int = 64
    ) -> AsyncIterator[Token]: ...


_WORD = re.compile(r"[\w']+")
_MARKS = re.compile(r"^\s*[,.!?;:]+")
_LONGEST_LOOP_WORDS = 20
# A draft written on a partial transcript whose last word the final recognition changed still
# fits when this many words before it agree and the two spellings are this alike: the
# recogniser revising a word it heard ("director" -> "directory", "come" -> "call"), not the
# user saying something else ("like" -> "hate").
_AGREED_BEFORE_REVISION = 3
_REVISION_SIMILARITY = 0.5


def strip_seam(prefix: str, continuation: str) -> str:
    """Drop words at the start of ``continuation`` that repeat the end of ``prefix``.

    The slow model sometimes restarts the committed words ("Yes, I love" + "love it, ...");
    the user must hear them once."""
    before = [w.lower() for w in _WORD.findall(prefix)]
    after = list(_WORD.finditer(continuation))
    for k in range(min(len(before), len(after)), 0, -1):
        if before[-k:] == [m.group().lower() for m in after[:k]]:
            rest = continuation[after[k - 1].end() :]
            # "No, no," + " no, no, it" -> " it": the prefix said the mark already
            return _MARKS.sub("", rest) if _MARKS.match(prefix.rstrip()[-1:]) else rest
    return continuation


def seam_undecided(prefix: str, continuation: str) -> bool:
    """Whether the start of ``continuation`` might still turn out to repeat the end of
    ``prefix``: some ending of the prefix agrees with every word so far (the last one may be
    cut mid-word) and is longer than the words complete so far. Until it is decided the
    continuation is held back; usually its first word settles it."""
    before = [w.lower() for w in _WORD.findall(prefix)]
    words = [w.lower() for w in _WORD.findall(continuation)]
    cut_mid_word = bool(words) and _WORD.match(continuation[-1]) is not None
    complete, partial = (words[:-1], words[-1]) if cut_mid_word else (words, "")
    for k in range(len(complete) + 1, len(before) + 1):
        ending = before[-k:]
        if ending[: len(complete)] == complete and ending[len(complete)].startswith(partial):
            return True
    return False


def repeats_itself(text: str) -> bool:
    """Whether ``text`` ends in a loop: one word four times running, a phrase of two to five
    words three times, or a longer one twice. Greedy decoding of a small model falls into
    these ("no, no, no, no, ..." until the token limit); a person does not talk like that."""
    words = [w.lower() for w in _WORD.findall(text)]
    for size in range(1, min(len(words) // 2, _LONGEST_LOOP_WORDS) + 1):
        times = 4 if size == 1 else 3 if size <= 5 else 2
        if len(words) >= size * times and words[-size * times :] == words[-size:] * times:
            return True
    return False


def _seam(prefix: str, continuation: str) -> str:
    """What to say after ``prefix``: the continuation without repeats, spaced correctly."""
    rest = strip_seam(prefix, continuation)
    needs_space = rest[:1].isalnum() and prefix[-1:] not in ("", " ", "\n")
    return " " + rest if needs_space else rest


class Relay:
    def __init__(
        self,
        settings: LlmSettings,
        drafter: Drafter,
        verifier: Verifier,
        continuer: Continuer,
        clock: Clock,
        emit: Emit,
        gate: CpuGate | None = None,
    ) -> None:
        """``gate``: drafting and verifying count as urgent work, so the slow model's reading
        steps aside for them (the draft is what the user hears first)."""
        self._settings = settings
        self._drafter = drafter
        self._verifier = verifier
        self._continuer = continuer
        self._clock = clock
        self._emit = emit
        self.history: list[Message] = [Message(role="system", content=settings.system_prompt)]
        self._gate = gate
        self._speculation: tuple[str, asyncio.Task[Draft | None]] | None = None
        self._drafting: asyncio.Task[Draft | None] | None = None  # the latest draft begun
        self._reply: asyncio.Task[None] | None = None
        self._final: asyncio.Future[str] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._heard: str | None = None  # what the user heard of a reply they cut off
        self._unread: str | None = None  # turn words the models have not read yet
        self._reader: asyncio.Task[None] | None = None
        self._drafter_read: list[Message] = []  # the prompt the drafter read last
        self._slow_read: tuple[list[Message], str] = ([], "")  # the slow model's, and opening
        self._reply_failed = False  # the reply in progress lost words to a failing model
        self.turn_id = 0

    def on_event(self, event: Event) -> None:
        if isinstance(event, SpeechStarted) and not self._background:
            self._background_task(self._warm())
        elif isinstance(event, TurnWords) and self._settings.mode != "fast":
            self._read_ahead(self._clip(event.transcript))
        elif isinstance(event, TurnMaybeEnded) and self._settings.mode == "relay":
            self._speculate(self._clip(event.transcript), urgent=not event.speaking)
        elif isinstance(event, TurnResumed):
            self._drop_speculation()
        elif isinstance(event, TurnEnded):
            self._start_reply(event)
        elif isinstance(event, TurnTranscript) and self._final and not self._final.done():
            self._final.set_result(self._clip(event.transcript))

    @property
    def mode(self) -> RelayMode:
        return self._settings.mode

    @mode.setter
    def mode(self, mode: RelayMode) -> None:
        """Switch how the next replies are made (a reply under way finishes as it began)."""
        self._settings = dataclasses.replace(self._settings, mode=mode)

    def _clip(self, transcript: str) -> str:
        """The last ``max_user_words`` of a turn: a monologue must not stall the reply on
        reading thousands of tokens (the words nearest the turn's end matter most)."""
        words = transcript.split()
        limit = self._settings.max_user_words
        return " ".join(words[-limit:]) if len(words) > limit else transcript

    def _speculate(self, transcript: str, urgent: bool) -> None:
        """Draft for ``transcript`` unless the draft in hand still fits it; then the models
        read the turn so far (the slow one after the draft, and the draft too), so that at
        the turn's end only the words that came since are new."""
        current = self._speculation
        if current is None or not self._still_fits(current[0], transcript):
            self._drop_speculation()
            draft = self._start_draft(transcript, speculative=True, urgent=urgent)
            self._speculation = (transcript, draft)
        self._read_ahead(transcript)

    def _still_fits(self, drafted_on: str, transcript: str) -> bool:
        """A speculative draft still answers ``transcript`` when it was written on the same
        words, or on all but the last ``speculation_missing_words`` of them: the final
        recognition of a pause often adds a word, and a prefix is a safe opening by design.
        The last word it was written on may also be one the recogniser then revised (see
        ``_REVISION_SIMILARITY``). In one `eval latency --quick` run, 3 of 22 turns ended on
        such a revision, and each had waited for a new draft and its synthesis (170-430 ms)."""
        before, now = _WORD.findall(drafted_on.lower()), _WORD.findall(transcript.lower())
        agreed = 0
        while agreed < min(len(before), len(now)) and before[agreed] == now[agreed]:
            agreed += 1
        revised = len(before) - agreed
        if revised == 1 and agreed >= _AGREED_BEFORE_REVISION and agreed < len(now):
            heard, final = before[agreed], now[agreed]
            if difflib.SequenceMatcher(None, heard, final).ratio() >= _REVISION_SIMILARITY:
                revised = 0  # the same word, heard better
        missing = len(now) - len(before)
        return revised == 0 and 0 <= missing <= self._settings.speculation_missing_words

    def _start_draft(
        self, transcript: str, speculative: bool, urgent: bool
    ) -> asyncio.Task[Draft | None]:
        self._drafting = asyncio.create_task(self._verified_draft(transcript, speculative, urgent))
        return self._drafting

    async def _verified_draft(
        self, transcript: str, speculative: bool, urgent: bool
    ) -> Draft | None:
        """A draft the verifier accepts, or None. An accepted speculative draft is announced
        (``DraftReady``) so the voice can synthesise it before the turn is confirmed. The
        verifier reads the user's words while the drafter writes. An ``urgent`` draft (the
        user has paused: it is what they hear next) makes the slow model step aside."""
        history = list(self.history)
        gate = self._gate if urgent else None
        with gate.urgent() if gate is not None else contextlib.nullcontext():
            reading = asyncio.create_task(self._verifier.read(history, transcript))
            try:
                draft = await self._drafter.draft(history, transcript)
                await reading
            finally:
                reading.cancel()
            if not draft.text.strip() or not await self._verifier.accept(history, draft):
                return None
        if speculative:
            self._emit(DraftReady(t=self._clock.now(), transcript=transcript, text=draft.text))
        return draft

    def _background_task(self, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _warm(self) -> None:
        """The user has begun a turn: evaluate the history now, while they speak, so that at
        the turn's end both models read only the new words. Drafter first: its words are
        heard first."""
        try:
            if self._settings.mode != "cascaded":
                await self._drafter.prefill(list(self.history))
            if self._settings.mode != "fast":
                await self._continuer.prefill(list(self.history))
        except BackendError as exc:  # only speed is lost
            self._error(f"pre-fill failed: {exc}")

    async def idle(self) -> None:
        """Until background pre-fills are done (offline evaluation: the user spoke long enough)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _read_ahead(self, transcript: str) -> None:
        """Let the models read the turn while the user speaks, so that at its end only the
        last words are new (their prompt caches keep what they read). One pre-fill at a
        time, always of the newest words."""
        self._unread = transcript
        if self._reader is None or self._reader.done():
            self._reader = self._background_task(self._read_words())

    async def _read_words(self) -> None:
        while self._unread is not None:
            transcript, self._unread = self._unread, None
            prompt = [*self.history, Message(role="user", content=transcript)]
            try:
                # A maybe-end often repeats the words last read: each model reads only news.
                if self._settings.mode == "relay" and prompt != self._drafter_read:
                    self._drafter_read = prompt  # small and quick: a draft then starts sooner
                    await self._drafter.prefill(list(self.history), transcript)
                if self._drafting is not None:  # the draft's words are heard first: it goes first
                    await asyncio.gather(self._drafting, return_exceptions=True)
                opening = self._opening(transcript)
                if (prompt, opening) != self._slow_read:
                    self._slow_read = (prompt, opening)
                    await self._continuer.prefill(prompt, opening)
            except BackendError as exc:  # only speed is lost
                self._error(f"pre-fill failed: {exc}")

    def _opening(self, transcript: str) -> str:
        """The accepted draft a reply to ``transcript`` would open with, once it is written:
        the slow model reads it too, so that on commit it continues at once."""
        speculation = self._speculation
        if speculation is None or not self._still_fits(speculation[0], transcript):
            return ""
        task = speculation[1]
        if not task.done() or task.cancelled() or task.exception() is not None:
            return ""
        draft = task.result()
        return draft.text if draft is not None else ""

    def _drop_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation[1].cancel()
            self._speculation = None

    def _start_reply(self, event: TurnEnded) -> None:
        self.cancel()  # a new turn supersedes whatever was still being said
        self.turn_id += 1
        self._final = asyncio.get_running_loop().create_future()
        self._reply = asyncio.create_task(self._respond(self.turn_id, event))

    def cancel(self) -> None:
        """Stop the reply in progress (the user interrupted)."""
        if self._reply is not None and not self._reply.done():
            self._reply.cancel()
        self._reply = None

    def interrupt(self, heard: str) -> None:
        """The user cut the reply off: stop it, and keep in history only what they heard
        (whether the text was still being written or already complete)."""
        if self._reply is not None and not self._reply.done():
            self._heard = heard
            self.cancel()
        elif self.history and self.history[-1].role == "assistant":
            self.history[-1] = Message(role="assistant", content=heard)

    async def close(self) -> None:
        """The conversation is over: the reply, the draft and the reading ahead stop (a
        pre-fill still waiting for its model leaves the queue)."""
        self.cancel()
        self._drop_speculation()
        for task in self._background:
            task.cancel()
        await self.wait()
        await self.idle()

    async def wait(self) -> None:
        """Until the reply in progress is done (for tests and offline evaluation)."""
        if self._reply is not None:
            await asyncio.gather(self._reply, return_exceptions=True)

    async def _transcript(self, event: TurnEnded) -> str:
        """The final transcript: it may still be on its way when the turn ends."""
        assert self._final is not None
        try:
            wait = self._settings.final_transcript_wait_s
            return await wait_for(self._clock, asyncio.shield(self._final), wait)
        except TimeoutError:
            return self._clip(event.transcript)

    async def _respond(self, turn: int, event: TurnEnded) -> None:
        started, said = self._clock.now(), ""
        self._reply_failed = False
        try:
            if self._settings.mode == "fast":
                messages = [
                    *self.history,
                    Message(role="user", content=await self._transcript(event)),
                ]
                said = await self._say(turn, "full", self._drafter.stream(messages))
            else:
                draft = await self._draft(self._clip(event.transcript))
                if draft is not None:
                    said = draft.text
                    self._delta(turn, said, "prefix")
                    self._metric(turn, "prefix_ms", started)
                messages = [
                    *self.history,
                    Message(role="user", content=await self._transcript(event)),
                ]
                stream = self._continuer.stream(messages, said, self._settings.max_reply_tokens)
                said += await self._say(turn, "continuation" if said else "full", stream, said)
        except asyncio.CancelledError:
            self._finish(turn, event, said, cancelled=True)
            raise
        except Exception as exc:  # a model that throws loses this reply, not the conversation
            self._error(f"reply {turn} failed: {type(exc).__name__}: {exc}", reply_failed=True)
        if self._reply_failed and not said.strip():
            said = self._send(turn, "full", self._settings.apology, first=True)
        self._finish(turn, event, said, cancelled=False)

    async def _draft(self, transcript: str) -> Draft | None:
        """The verified prefix, or None when the slow model should answer alone."""
        if self._settings.mode != "relay":
            return None
        speculation, self._speculation = self._speculation, None
        try:
            if speculation is not None and self._still_fits(speculation[0], transcript):
                return await speculation[1]
            if speculation is not None:
                speculation[1].cancel()
            return await self._start_draft(transcript, speculative=False, urgent=True)
        except BackendError as exc:
            self._error(f"draft failed, slow path answers alone: {exc}")
            return None

    async def _say(
        self, turn: int, source: ResponseSource, tokens: AsyncIterator[Token], after: str = ""
    ) -> str:
        """Forward a token stream as text deltas and return the text sent. After a committed
        prefix the first words are held back until the seam is clean. A reply that starts
        repeating itself ends before the repeat that shows it. A backend that fails or stalls
        ends the reply where it is, with a StageError saying why."""
        pending, sent, seam_open = "", "", bool(after)
        timeout = self._settings.first_token_timeout_s
        try:
            while (token := await self._next(tokens, timeout)) is not None:
                timeout = self._settings.token_timeout_s
                text = pending + token.text
                if repeats_itself(after + (_seam(after, text) if seam_open else sent + text)):
                    break
                pending += token.text
                if seam_open:
                    if seam_undecided(after, pending):
                        continue
                    pending, seam_open = _seam(after, pending), False
                sent += self._send(turn, source, pending, first=not sent and not after)
                pending = ""
        except (BackendError, TimeoutError) as exc:
            self._error(f"reply {turn} ended early: {exc or type(exc).__name__}", reply_failed=True)
            return sent
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]
        if seam_open:
            pending = _seam(after, pending)
        return sent + self._send(turn, source, pending, first=not sent and not after)

    async def _next(self, tokens: AsyncIterator[Token], timeout: float) -> Token | None:
        try:
            return await wait_for(self._clock, anext(tokens), timeout)
        except StopAsyncIteration:
            return None

    def _send(self, turn: int, source: ResponseSource, text: str, first: bool) -> str:
        text = text.lstrip() if first else text
        if text:
            self._delta(turn, text, source)
        return text

    def _finish(self, turn: int, event: TurnEnded, said: str, cancelled: bool) -> None:
        final = (
            self._final.result()
            if self._final and self._final.done()
            else self._clip(event.transcript)
        )
        heard, self._heard = self._heard, None
        self.history += [
            Message(role="user", content=final),
            Message(role="assistant", content=(said if heard is None else heard).strip()),
        ]
        self._emit(
            ResponseDone(t=self._clock.now(), turn_id=turn, text=said.strip(), cancelled=cancelled)
        )

    def _delta(self, turn: int, text: str, source: ResponseSource) -> None:
        self._emit(ResponseTextDelta(t=self._clock.now(), turn_id=turn, text=text, source=source))

    def _metric(self, turn: int, name: str, since: float) -> None:
        self._emit(
            Metric(
                t=self._clock.now(),
                name=name,
                value=(self._clock.now() - since) * 1000,
                turn_id=turn,
            )
        )

    def _error(self, message: str, reply_failed: bool = False) -> None:
        self._reply_failed |= reply_failed
        self._emit(
            StageError(t=self._clock.now(), stage="llm", message=message, reply_failed=reply_failed)
        )
