"""The websocket endpoints' client-message parsers, fuzzed with Hypothesis: ``/v1/realtime``'s
client events and ``/v1/pcm``'s text messages.

Inputs: text that is not JSON, arbitrary JSON values, and events whose ``type`` is a known
name, a near miss or anything at all, with garbage in the known fields (audio that is not
base64 or not ASCII, wrong types, huge and non-finite numbers, deep nesting, unicode).
Each must get one protocol ``error`` event, or be handled as the valid event it is; a valid
event after it must still work; nothing may be left running.

Two layers: the conversation's ``handle`` called directly on a real session with the fake
stages (``web_fakes``), many examples; then fewer through a real websocket to the server.
Every run is derandomized and keeps no example database, so it is the same run each time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import WSMessage, WSMsgType
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web_fakes import FakeEngine, b64, serving, speech

from voice.clock import RealClock
from web import webrtc
from web.hub import Hub
from web.messages import MODES
from web.pcm import Pcm
from web.realtime import RATE, UNSUPPORTED, Realtime
from web.server import create_app
from web.websocket import Conversation

HANDLED = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.cancel",
)
KNOWN = HANDLED + UNSUPPORTED
# what a session.update may be refused with
UPDATE_CODES = {"invalid_value", "unsupported_value", "unsupported_audio_format"}
ALL_CODES = {
    "invalid_json",
    "invalid_event",
    "unknown_event",
    "unsupported_event",
    "invalid_base64",
    "invalid_audio",
    "input_audio_buffer_commit_empty",
    "response_cancel_not_active",
    *UPDATE_CODES,
}
DEEP = 500  # nesting past which the parser may run out of stack: invalid_json is then fair
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FOLLOW = '{"type": "input_audio_buffer.clear", "event_id": "follow"}'
PCM_FOLLOW = '{"type": "mode", "mode": "fast"}'


# --- what to send -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put into a message as it is (numbers json.dumps would not write)."""

    text: str


def dump(value: object) -> str:
    """``json.dumps`` that writes ``Raw`` leaves verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``options``, each drawn in proportion to its weight (shrinking to the first)."""
    pool = [strategy for weight, strategy in options for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of ``fields``."""
    return st.fixed_dictionaries({}, optional=fields)


def utf8(message: str) -> bool:
    """Whether a websocket text message can hold it (no lone surrogates)."""
    try:
        message.encode()
    except UnicodeEncodeError:
        return False
    return True


numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN and Infinity
    st.sampled_from(["1e999", "-1e999", "1E-999", "-0", "24000.0", "2.4e4", "1e308"]).map(Raw),
    # around Python's 4300-digit limit on int(str) (past it: a known bug, below)
    st.integers(min_value=300, max_value=6000).map(lambda n: Raw("9" * n)),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "\x00", "\u202e", "\ud800", "é", "😀", "a" * 5000]),
)
deep = st.integers(min_value=1, max_value=2000).map(lambda n: Raw("[" * n + "]" * n))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
garbage = weighted((7, json_values), (1, deep))
malformed = st.sampled_from(
    ['{"type": ', "{not json", "[", '"type"', "nul", "{}{}", "\x00{}", "{'a': 1}", "", " "]
)

kinds = weighted(
    (1, st.sampled_from(KNOWN).map(str.upper)),
    (1, st.sampled_from(KNOWN).map(lambda k: k + " ")),
    (1, st.sampled_from(KNOWN).map(lambda k: k.replace(".", "_"))),
    (1, st.sampled_from(["session.created", "error", "mode", "ping", "response.done", ""])),
    (2, texts),
    (2, garbage),
)
pcm16 = st.lists(st.integers(-32768, 32767), min_size=1, max_size=400).map(
    lambda samples: base64.b64encode(np.array(samples, "<i2").tobytes()).decode()
)
base64_audio = st.one_of(
    st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()),  # odd lengths too
    st.sampled_from(["AAAA", "AA==", "AAA", "=", "AA=A", "AA AA", "AA\nAA", "-_-_", "QUFB\x00"]),
    texts,
)
audio_format = weighted(
    (1, garbage),
    (
        3,
        optional(
            type=weighted((3, st.just("audio/pcm")), (1, st.just("audio/pcmu")), (1, garbage)),
            rate=weighted((3, st.just(RATE)), (1, st.just(16000)), (1, numbers), (1, garbage)),
        ),
    ),
)
session_config = weighted(
    (1, garbage),
    (
        4,
        optional(
            type=weighted((3, st.just("realtime")), (1, st.just("transcription")), (1, garbage)),
            output_modalities=weighted((3, st.just(["audio"])), (1, garbage)),
            instructions=garbage,
            audio=weighted(
                (1, garbage),
                (
                    4,
                    optional(
                        input=weighted(
                            (1, garbage),
                            (
                                4,
                                optional(
                                    format=audio_format,
                                    turn_detection=st.sampled_from([None, {"type": "server_vad"}]),
                                ),
                            ),
                        ),
                        output=weighted(
                            (1, garbage), (4, optional(format=audio_format, voice=garbage))
                        ),
                    ),
                ),
            ),
        ),
    ),
)
fields = {
    "session.update": optional(session=session_config),
    "input_audio_buffer.append": weighted(
        (3, st.fixed_dictionaries({"audio": pcm16})),
        (3, st.fixed_dictionaries({"audio": base64_audio})),
        (1, optional(audio=garbage)),
    ),
    "response.cancel": optional(response_id=weighted((1, st.just("resp_x")), (1, garbage))),
}


@st.composite
def realtime_events(draw: st.DrawFn) -> dict[str, Any]:
    """An object with a ``type`` (usually a known one) and garbage in its known fields."""
    kind = draw(
        weighted((6, st.sampled_from(HANDLED)), (2, st.sampled_from(UNSUPPORTED)), (3, kinds))
    )
    event: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        event["event_id"] = draw(weighted((3, texts), (1, garbage)))
    known = kind if isinstance(kind, str) else ""
    event |= draw(fields.get(known, optional(audio=garbage, session=garbage)))
    event |= draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2))
    if draw(st.booleans()):  # the fields in another order
        event = dict(reversed(event.items()))
    return event


realtime_messages = weighted(
    (8, realtime_events().map(dump)), (1, garbage.map(dump)), (1, texts), (1, malformed)
).filter(utf8)
pcm_messages = weighted(
    (
        6,
        optional(
            type=weighted((3, st.just("mode")), (1, kinds)),
            mode=weighted(
                (3, st.sampled_from(MODES)),
                (1, st.sampled_from(MODES).map(str.upper)),
                (2, garbage),
            ),
            audio=garbage,
        ).map(dump),
    ),
    (1, garbage.map(dump)),
    (1, texts),
    (1, st.sampled_from(['{"type": "mode"', "mode", '{"type": "mode"}', "{not json", "["])),
).filter(utf8)


# --- what the answer must be ------------------------------------------------------------------


def depth(text: str) -> int:
    """How deep brackets nest in ``text``, outside JSON strings."""
    deepest = level = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', text):
        if token[0] in "[{":
            level += 1
            deepest = max(deepest, level)
        elif token[0] in "]}":
            level -= 1
    return deepest


@dataclass
class Expected:
    codes: set[str]  # error codes it may get
    ok: bool  # whether it may be taken as a valid event instead
    ack: str | None = None  # the event a valid one gets
    event_id: str | None = None  # what its error must echo


def realtime_expected(text: str) -> Expected:
    if depth(text) > DEEP:
        return Expected(ALL_CODES, ok=True)
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return Expected({"invalid_json"}, ok=False)
    if not isinstance(event, dict):
        return Expected({"invalid_event"}, ok=False)
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    kind = event.get("type")
    if kind == "session.update":
        return Expected(UPDATE_CODES, ok=True, ack="session.updated", event_id=event_id)
    if kind == "input_audio_buffer.append":
        return Expected({append_error(event.get("audio")) or ""} - {""}, ok=True, event_id=event_id)
    if kind == "input_audio_buffer.commit":
        return Expected({"input_audio_buffer_commit_empty"}, ok=True, event_id=event_id)
    if kind == "input_audio_buffer.clear":
        return Expected(set(), ok=True, ack="input_audio_buffer.cleared", event_id=event_id)
    if kind == "response.cancel":
        return Expected({"response_cancel_not_active"}, ok=True, event_id=event_id)
    code = "unsupported_event" if kind in UNSUPPORTED else "unknown_event"
    return Expected({code}, ok=False, event_id=event_id)


def append_error(audio: object) -> str | None:
    """The error an ``input_audio_buffer.append`` with this audio gets (None: it is audio)."""
    if not isinstance(audio, str):
        return "invalid_value"
    try:
        pcm = base64.b64decode(audio, validate=True)
    except ValueError:  # binascii.Error, or text that is not ASCII
        return "invalid_base64"
    return "invalid_audio" if not pcm or len(pcm) % 2 else None


def check_realtime_answer(text: str, answer: list[dict[str, Any]]) -> None:
    """``answer``: the events sent while ``text`` was handled (speech events may be among them)."""
    expected = realtime_expected(text)
    for event in answer:
        assert isinstance(event.get("type"), str) and event["event_id"].startswith("event_")
    errors = [e["error"] for e in answer if e["type"] == "error"]
    assert all(e["type"] == "invalid_request_error" for e in errors), errors  # no server_error
    assert len(errors) <= 1, errors
    if errors:
        (error,) = errors
        assert error["code"] in expected.codes, (error, expected)
        assert isinstance(error["message"], str) and error["message"]
        if depth(text) <= DEEP and error["code"] != "invalid_json":
            assert error["event_id"] == expected.event_id
    else:
        assert expected.ok, f"no error event for {text[:200]!r}; expected {expected.codes}"
        if expected.ack is not None:
            assert [e["type"] for e in answer].count(expected.ack) == 1, answer


def pcm_expected(text: str) -> dict[str, Any] | None:
    """The ``mode`` event a valid message gets (None: it gets an error)."""
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(request, dict) and request.get("type") == "mode" and request.get("mode") in MODES:
        return {"type": "mode", "mode": request["mode"]}
    return None


def check_pcm_answer(text: str, answer: list[dict[str, Any]]) -> None:
    (message,) = answer  # one message for one message: nothing else is said without audio
    expected, deep = pcm_expected(text), depth(text) > DEEP
    if message["type"] == "mode":
        assert message == expected or (deep and message["mode"] in MODES), (message, text[:200])
        return
    assert message["type"] == "error" and message["message"], message
    assert deep or expected is None, f"{message} for {text[:200]!r}"
    try:
        json.loads(text)
        codes = {"invalid_message"}
    except (ValueError, RecursionError):
        codes = {"invalid_json"}
    if deep:
        codes = {"invalid_json", "invalid_message"}
    assert message["code"] in codes, (message, text[:200])


# --- the parsers, called directly ---------------------------------------------------------------


class Recorder:
    """Stands in for the conversation's ``Link``: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    def send(self, message: str | bytes) -> None:
        self.sent.append(message)

    def take(self) -> list[dict[str, Any]]:
        events = [json.loads(m) for m in self.sent if isinstance(m, str)]
        self.sent.clear()
        return events


@contextmanager
def loop_errors(runner: asyncio.Runner) -> Iterator[None]:
    """Fails on any exception that a task of the loop left unhandled (an observer's, say)."""
    errors: list[dict[str, Any]] = []
    runner.get_loop().set_exception_handler(lambda _, context: errors.append(context))
    yield
    assert not errors, errors


@contextmanager
def conversation(kind: type[Conversation], path: str) -> Iterator[tuple[Any, Recorder]]:
    """A conversation of ``kind`` on a real session with the fake stages, on one event loop
    for every example; (a function that runs a coroutine there, the recorder). Leaves no task
    behind."""
    engine = FakeEngine()
    hub = Hub(engine, RealClock())  # type: ignore[arg-type]
    app = create_app(hub, engine.settings)  # type: ignore[arg-type]
    with asyncio.Runner() as runner, loop_errors(runner):
        stack = AsyncExitStack()

        async def start() -> Conversation:
            talk = kind(make_mocked_request("GET", path, app=app))
            talk.link = Recorder()  # type: ignore[assignment]
            session = await stack.enter_async_context(
                hub.session(talk.input_rate, talk.output_rate, talk.mode, observer=talk.observe)
            )
            talk._session = session  # what Conversation.run does on admission
            talk.started()
            return talk

        talk = runner.run(start())
        recorder: Recorder = talk.link  # type: ignore[assignment]
        recorder.take()  # the greeting
        try:
            yield runner.run, talk, recorder
        finally:
            runner.run(stack.aclose())

            async def left() -> set[asyncio.Task[Any]]:
                await asyncio.sleep(0)
                return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

            assert not runner.run(left()), "tasks left running after the session closed"
    assert hub.metrics.sessions_active == 0


def text(data: str) -> WSMessage:
    return WSMessage(WSMsgType.TEXT, data, None)


def test_the_realtime_parser_answers_anything_and_goes_on():
    with conversation(Realtime, "/v1/realtime?model=relayvoice") as (run, talk, recorder):

        @settings(FUZZ, max_examples=600)
        @given(realtime_messages)
        def answers(message: str) -> None:
            recorder.take()  # what the session said in between
            run(talk.handle(text(message)))
            check_realtime_answer(message, recorder.take())
            run(talk.handle(text(FOLLOW)))
            answer = recorder.take()
            assert "input_audio_buffer.cleared" in [e["type"] for e in answer], answer
            assert "error" not in [e["type"] for e in answer], answer

        answers()


def test_the_realtime_parser_takes_real_audio_among_the_garbage():
    """Speech between bad events: the session hears it and answers the turn."""
    with conversation(Realtime, "/v1/realtime?model=relayvoice") as (run, talk, recorder):

        async def say() -> list[str]:
            audio = {"type": "input_audio_buffer.append", "audio": b64(speech(RATE))}
            await talk.handle(text(json.dumps(audio)))
            await talk.handle(text('{"type": "input_audio_buffer.append", "audio": 7}'))
            await asyncio.sleep(0.5)
            return [e["type"] for e in recorder.take()]

        kinds = run(say())
        assert "input_audio_buffer.speech_started" in kinds and "response.created" in kinds
        assert kinds.count("error") == 1


def test_the_pcm_parser_answers_anything_and_goes_on():
    with conversation(Pcm, "/v1/pcm?rate=16000") as (run, talk, recorder):

        @settings(FUZZ, max_examples=600)
        @given(pcm_messages)
        def answers(message: str) -> None:
            run(talk.handle(text(message)))
            check_pcm_answer(message, recorder.take())
            run(talk.handle(text(PCM_FOLLOW)))
            assert recorder.take() == [{"type": "mode", "mode": "fast"}]
            assert talk.session.mode == "fast"

        answers()


# --- through a real websocket -------------------------------------------------------------------


class Wire:
    """One server with the fake engine and one client connection, kept across examples
    (reopened if an example killed it, so that each example starts on a live one)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stack = AsyncExitStack()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connections = 0

    async def start(self) -> None:
        self.served = await self.stack.enter_async_context(serving())
        self.http = await self.stack.enter_async_context(aiohttp.ClientSession())

    async def connection(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.http.ws_connect(f"{self.served.ws_url}{self.path}")
            self.connections += 1
            greeting = await self.receive()
            assert greeting["type"] in ("session.created", "ready"), greeting
        return self.ws

    async def receive(self) -> dict[str, Any]:
        assert self.ws is not None
        async with asyncio.timeout(5):
            message = await self.ws.receive()
        assert message.type is WSMsgType.TEXT, f"the server closed: {message}"
        return json.loads(message.data)

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            assert self.ws.close_code == aiohttp.WSCloseCode.OK, self.ws.close_code
        hub = self.served.hub
        async with asyncio.timeout(5):
            while hub.metrics.sessions_active:
                await asyncio.sleep(0.01)
        await self.stack.aclose()
        await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert not left, left


@contextmanager
def wire(path: str) -> Iterator[tuple[Any, Wire]]:
    with asyncio.Runner() as runner, loop_errors(runner):
        link = Wire(path)
        runner.run(link.start())
        try:
            yield runner.run, link
        finally:
            runner.run(link.stop())


def test_the_realtime_websocket_answers_anything_and_stays_usable(caplog):
    with wire("/v1/realtime?model=relayvoice") as (run, link):

        async def exchange(message: str, n: int) -> list[dict[str, Any]]:
            """``message``, then a valid event and a probe; what came back before the probe's
            error."""
            ws = await link.connection()
            probe = f"probe-{n}"
            await ws.send_str(message)
            await ws.send_str(FOLLOW)
            await ws.send_str(json.dumps({"type": "response.create", "event_id": probe}))
            events = []
            while (event := await link.receive())["type"] != "error" or (
                event["error"]["event_id"] != probe
            ):
                events.append(event)
            return events

        examples = iter(range(10**6))

        @settings(FUZZ, max_examples=30)
        @given(realtime_messages)
        def answers(message: str) -> None:
            events = run(exchange(message, next(examples)))
            cleared = [e for e in events if e["type"] == "input_audio_buffer.cleared"]
            expected = realtime_expected(message)
            assert len(cleared) == 1 + (expected.ack == "input_audio_buffer.cleared"), events
            check_realtime_answer(message, [e for e in events if e is not cleared[-1]])

        answers()
        assert link.connections == 1  # no example cost the connection
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no handler died


def test_the_pcm_websocket_answers_anything_and_stays_usable(caplog):
    with wire("/v1/pcm?rate=16000") as (run, link):

        async def exchange(message: str) -> list[dict[str, Any]]:
            ws = await link.connection()
            await ws.send_str(message)
            await ws.send_str(PCM_FOLLOW)
            return [await link.receive(), await link.receive()]

        @settings(FUZZ, max_examples=30)
        @given(pcm_messages)
        def answers(message: str) -> None:
            answer, follow = run(exchange(message))
            check_pcm_answer(message, [answer])
            assert follow == {"type": "mode", "mode": "fast"}

        answers()
        assert link.connections == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- what the fuzz found ------------------------------------------------------------------------

BIG = "1" * 5000  # past Python's 4300-digit limit: json.loads raises a plain ValueError


async def answered_then_usable(path: str, message: str, follow: str, ack: str) -> dict[str, Any]:
    """The error event ``message`` gets over a websocket, after checking that ``follow``
    still gets ``ack`` on the same connection."""
    async with serving() as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{served.ws_url}{path}")
        await ws.receive()  # the greeting
        await ws.send_str(message)
        await ws.send_str(follow)
        answers = []
        async with asyncio.timeout(5):
            while not answers or answers[-1]["type"] != ack:
                received = await ws.receive()
                assert received.type is WSMsgType.TEXT, f"the server closed: {received}"
                answers.append(json.loads(received.data))
        await ws.close()
    assert [a["type"] for a in answers] == ["error", ack]
    return answers[0]


async def test_non_ascii_audio_is_invalid_base64_and_the_connection_goes_on():
    error = await answered_then_usable(
        "/v1/realtime",
        '{"type": "input_audio_buffer.append", "audio": "é", "event_id": "e1"}',
        FOLLOW,
        "input_audio_buffer.cleared",
    )
    assert error["error"]["code"] == "invalid_base64" and error["error"]["event_id"] == "e1"


async def test_an_integer_json_cannot_hold_is_invalid_json_on_realtime():
    error = await answered_then_usable(
        "/v1/realtime",
        f'{{"type": "input_audio_buffer.clear", "n": {BIG}}}',
        FOLLOW,
        "input_audio_buffer.cleared",
    )
    assert error["error"]["code"] == "invalid_json"


async def test_an_integer_json_cannot_hold_is_invalid_json_on_pcm():
    error = await answered_then_usable(
        "/v1/pcm", f'{{"type": "mode", "mode": {BIG}}}', PCM_FOLLOW, "mode"
    )
    assert error["code"] == "invalid_json"


async def test_an_error_about_a_huge_value_does_not_repeat_it_whole():
    # 400 kB of UTF-8, under max_message_bytes (1 MiB); 1.2 MB as \ud83d\ude00 escapes
    message = json.dumps({"type": "😀" * 100_000, "event_id": "e1"}, ensure_ascii=False)
    error = await answered_then_usable(
        "/v1/realtime", message, FOLLOW, "input_audio_buffer.cleared"
    )
    assert error["error"]["code"] == "unknown_event"


@pytest.mark.parametrize("body", [f'{{"n": {BIG}}}', "[" * 100_000 + "]" * 100_000])
async def test_an_offer_json_cannot_hold_is_a_json_400(body):
    async with (
        serving() as served,
        aiohttp.ClientSession() as http,
        http.post(f"{served.url}{webrtc.OFFER_PATH}", data=body) as response,
    ):
        assert response.status == 400 and response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == "invalid_json"
