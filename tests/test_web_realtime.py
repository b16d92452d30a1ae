"""``/v1/realtime`` over real sockets with scripted stages: the official ``openai`` SDK as the
client, then a raw websocket for what the SDK would never send (bad JSON, bad audio, ...)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
from fakes import WORD_S
from openai import AsyncOpenAI
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ResponseAudioDeltaEvent,
    ResponseDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from web_fakes import SENTENCE, FakeEngine, b64, serving, speech
from websockets.exceptions import InvalidStatus

from voice.audio import pcm16_to_float32
from voice.settings import Settings

RATE = 24000
PCM24 = {"type": "audio/pcm", "rate": RATE}


async def events_until(ws: aiohttp.ClientWebSocketResponse, last: str) -> list[dict[str, Any]]:
    """Server events up to and including the first of type ``last``."""
    events = []
    async with asyncio.timeout(5):
        while True:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.TEXT, message
            events.append(json.loads(message.data))
            if events[-1]["type"] == last:
                return events


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_the_openai_sdk_holds_a_conversation():
    async with serving() as served:
        client = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused")
        async with client.realtime.connect(model="relayvoice") as connection:
            await connection.session.update(
                session={
                    "type": "realtime",
                    "audio": {
                        "input": {"format": PCM24, "turn_detection": {"type": "server_vad"}},
                        "output": {"format": PCM24},
                    },
                }
            )
            await connection.input_audio_buffer.append(audio=b64(speech(RATE)))
            events = []
            async with asyncio.timeout(5):
                async for event in connection:
                    events.append(event)
                    if event.type == "response.done":
                        break
    for event in events:  # the SDK picked the class by type; the shapes must validate too
        type(event).model_validate(event.model_dump(exclude_unset=True))
    kinds = [e.type for e in events]
    assert isinstance(events[0], SessionCreatedEvent)
    assert isinstance(events[1], SessionUpdatedEvent)
    assert events[1].session.audio.input.format.rate == RATE
    assert (
        kinds.index("input_audio_buffer.speech_started")
        < kinds.index("input_audio_buffer.speech_stopped")
        < kinds.index("input_audio_buffer.committed")
        < kinds.index("response.created")
    )
    (completed,) = [e for e in events if e.type.endswith("input_audio_transcription.completed")]
    assert isinstance(completed, ConversationItemInputAudioTranscriptionCompletedEvent)
    assert completed.transcript == SENTENCE
    user_item = next(e for e in events if e.type == "input_audio_buffer.committed").item_id
    deltas = [e for e in events if e.type.endswith("input_audio_transcription.delta")]
    assert "".join(d.delta for d in deltas) == SENTENCE
    assert {d.item_id for d in deltas} == {completed.item_id} == {user_item}
    audio = [e for e in events if isinstance(e, ResponseAudioDeltaEvent)]
    samples = np.concatenate([pcm16_to_float32(base64.b64decode(a.delta)) for a in audio])
    assert (samples > 0.1).sum() == round(8 * WORD_S * RATE)  # every word, played once
    done = events[-1]
    assert isinstance(done, ResponseDoneEvent) and done.response.status == "completed"
    transcript = done.response.output[0].content[0].transcript
    assert transcript == "Yes, I love football because it is fun"
    assert {a.response_id for a in audio} == {done.response.id}


async def test_the_sdk_api_key_is_the_server_token():
    settings = Settings()
    settings.server.token = "s3cret"
    async with serving(FakeEngine(settings)) as served:
        client = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="s3cret")
        async with client.realtime.connect(model="relayvoice") as connection:
            assert (await connection.recv()).type == "session.created"
        client = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="wrong")
        with pytest.raises(InvalidStatus) as refused:
            async with client.realtime.connect(model="relayvoice"):
                pass
        assert refused.value.response.status_code == 401


async def connect(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{url}/v1/realtime?model=relayvoice")
    assert (await events_until(ws, "session.created"))[-1]["session"]["model"] == "relayvoice"
    return ws


async def error_for(ws: aiohttp.ClientWebSocketResponse, message: str | bytes) -> dict[str, Any]:
    await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
    return (await events_until(ws, "error"))[-1]["error"]


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        pytest.param("[" * 100_000 + "]" * 100_000, "invalid_json", None, id="too-deep"),
        ("[1, 2]", "invalid_event", None),
        ('{"type": "session.dance", "event_id": "e1"}', "unknown_event", "type"),
        ('{"type": "response.create", "event_id": "e1"}', "unsupported_event", "type"),
        (
            '{"type": "input_audio_buffer.append", "audio": "***", "event_id": "e1"}',
            "invalid_base64",
            "audio",
        ),
        (
            '{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e1"}',
            "invalid_audio",  # 3 bytes: not PCM16
            "audio",
        ),
        (
            '{"type": "input_audio_buffer.append", "audio": 7, "event_id": "e1"}',
            "invalid_value",
            "audio",
        ),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": "e1",
                    "session": {
                        "type": "realtime",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                    },
                }
            ),
            "unsupported_audio_format",
            "session.audio.input.format",
        ),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": "e1",
                    "session": {"audio": {"output": {"format": {"type": "audio/pcmu"}}}},
                }
            ),
            "unsupported_audio_format",
            "session.audio.output.format",
        ),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": "e1",
                    "session": {"audio": {"input": {"turn_detection": None}}},
                }
            ),
            "unsupported_value",
            "session.audio.input.turn_detection",
        ),
        (
            '{"type": "input_audio_buffer.commit", "event_id": "e1"}',
            "input_audio_buffer_commit_empty",
            None,
        ),
        ('{"type": "response.cancel", "event_id": "e1"}', "response_cancel_not_active", None),
    ],
)
async def test_bad_client_events_get_an_error_naming_them_and_the_session_goes_on(
    message, code, param
):
    async with serving() as served, aiohttp.ClientSession() as http:
        ws = await connect(http, served.url)
        error = await error_for(ws, message)
        assert error["code"] == code and error["param"] == param and error["message"]
        assert error["type"] == "invalid_request_error"
        assert error["event_id"] == ("e1" if "e1" in message else None)
        await ws.send_str('{"type": "input_audio_buffer.clear"}')
        assert (await events_until(ws, "input_audio_buffer.cleared"))[-1]
        await ws.close()


async def test_binary_messages_are_not_the_protocol():
    async with serving() as served, aiohttp.ClientSession() as http:
        ws = await connect(http, served.url)
        assert (await error_for(ws, b"\x00\x01"))["code"] == "invalid_event"
        await ws.close()


def append(samples: np.ndarray, event_id: str | None = None) -> str:
    event = {"type": "input_audio_buffer.append", "audio": b64(samples)}
    return json.dumps(event | ({"event_id": event_id} if event_id else {}))


async def test_response_cancel_stops_the_reply_and_history_keeps_what_was_heard():
    engine = FakeEngine(reply=[f" word{i}" for i in range(30)])
    async with serving(engine) as served, aiohttp.ClientSession() as http:
        ws = await connect(http, served.url)
        await ws.send_str(append(speech(RATE)))
        await events_until(ws, "response.output_audio.delta")
        await asyncio.sleep(0.35)
        await ws.send_str('{"type": "response.cancel", "event_id": "c1"}')
        events = await events_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        heard = done["output"][0]["content"][0]["transcript"]
        assert heard.startswith("Yes, I love") and len(heard.split()) < 10
        assert done["output"][0]["status"] == "incomplete"
        assert of(events, "response.output_audio_transcript.done")[0]["transcript"] == heard
        session = served.engine.sessions[0]
        await asyncio.sleep(0.3)  # nothing more of that reply
        assert not session.busy and session.records[-1].interruption == "cancel"
        assert session.relay.history[-1].content == heard
        assert (await error_for(ws, '{"type": "response.cancel", "event_id": "c2"}'))[
            "code"
        ] == "response_cancel_not_active"
        await ws.close()


async def test_speech_over_a_reply_cancels_it_and_the_next_turn_is_answered():
    engine = FakeEngine(reply=[f" word{i}" for i in range(30)])
    async with serving(engine) as served, aiohttp.ClientSession() as http:
        ws = await connect(http, served.url)
        await ws.send_str(append(speech(RATE)))
        first = await events_until(ws, "response.output_audio.delta")
        await ws.send_str(append(speech(RATE)))  # the user speaks again: a barge-in
        events = await events_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["id"] == of(first, "response.created")[0]["response"]["id"]
        assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        events = await events_until(ws, "response.created")
        items = [e["item_id"] for e in of(first + events, "input_audio_buffer.committed")]
        assert len(set(items)) == 2  # two user turns, two items
        completed = await events_until(ws, "conversation.item.input_audio_transcription.completed")
        assert completed[-1]["item_id"] == items[1]
        await ws.close()


async def test_commit_acknowledges_the_speech_so_far_once():
    async with serving() as served, aiohttp.ClientSession() as http:
        ws = await connect(http, served.url)
        await ws.send_str(append(speech(RATE, 0.3, 0)))
        started = await events_until(ws, "input_audio_buffer.speech_started")
        await ws.send_str('{"type": "input_audio_buffer.commit"}')
        (committed,) = of(
            await events_until(ws, "input_audio_buffer.committed"), "input_audio_buffer.committed"
        )
        assert committed["item_id"] == started[-1]["item_id"]
        await ws.send_str(append(speech(RATE, 0, 0.3)))  # the turn ends with the silence
        events = await events_until(ws, "response.created")
        assert not of(events, "input_audio_buffer.committed")
        assert of(events, "conversation.item.added")[0]["item"]["id"] == committed["item_id"]
        await ws.close()
