"""``/v1/pcm`` over a real socket with scripted stages: raw audio in and out, JSON events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import numpy as np
import pytest
from fakes import WORD_S
from web_fakes import SENTENCE, pcm, serving, speech

from voice.audio import pcm16_to_float32


@asynccontextmanager
async def pcm_socket(query: str = "") -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with (
        serving() as served,
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{served.url}/v1/pcm?{query}") as ws,
    ):
        yield ws


async def conversation(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict], np.ndarray]:
    """Events and reply audio until the reply's record arrives."""
    events, audio = [], []
    async with asyncio.timeout(5):
        while True:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                audio.append(pcm16_to_float32(message.data))
                continue
            assert message.type is aiohttp.WSMsgType.TEXT, message
            events.append(json.loads(message.data))
            if events[-1]["type"] == "turn_record":
                return events, np.concatenate(audio)


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_a_turn_in_raw_pcm(rate):
    async with pcm_socket(f"rate={rate}") as ws:
        ready = json.loads((await ws.receive()).data)
        assert len(ready.pop("session_id")) == 16
        assert ready == {"type": "ready", "sample_rate": rate, "mode": "relay"}
        await ws.send_bytes(pcm(speech(rate)))
        events, audio = await conversation(ws)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["speech_started", "transcript_partial"]
    order = ["speech_stopped", "transcript_final", "turn_ended", "turn_transcript", "reply_text"]
    assert [k for k in kinds if k in order][: len(order)] == order
    assert events[kinds.index("turn_transcript")]["transcript"] == SENTENCE
    assert (audio > 0.1).sum() == round(8 * WORD_S * rate)  # every word, once, at our rate
    record = events[-1]
    assert record["user_text"] == SENTENCE and record["heard_text"].startswith("Yes, I love")
    assert 0 < record["first_audio_out_ms"] < 1000
    assert record["turn_ended_ms"] >= 100  # the scripted turn gap
    assert record["stopped_ms"] is None and record["gap_ms"] == 0


async def test_the_mode_switches_from_the_next_reply_on():
    async with pcm_socket("mode=cascaded") as ws:
        assert json.loads((await ws.receive()).data)["mode"] == "cascaded"
        await ws.send_str('{"type": "mode", "mode": "fast"}')
        assert json.loads((await ws.receive()).data) == {"type": "mode", "mode": "fast"}
        await ws.send_bytes(pcm(speech(16000)))
        events, _ = await conversation(ws)
    assert events[-1]["mode"] == "fast" and events[-1]["reply_text"] == "Sure, fast reply."


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x00\x01\x02", "invalid_audio"),
        (b"", "invalid_audio"),
        ("{oops", "invalid_json"),
        ('{"type": "mode", "mode": "turbo"}', "invalid_message"),
        ('"mode"', "invalid_message"),
    ],
)
async def test_bad_messages_get_an_error_and_the_conversation_goes_on(message, code):
    async with pcm_socket() as ws:
        await ws.receive()
        await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
        error = json.loads((await ws.receive()).data)
        assert error["type"] == "error" and error["code"] == code and error["message"]
        await ws.send_bytes(pcm(speech(16000)))
        assert json.loads((await ws.receive()).data)["type"] == "speech_started"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("rate=44100", "unsupported_rate"),
        ("rate=abc", "unsupported_rate"),
        ("rate=%C2%B2", "unsupported_rate"),  # "²"
        ("mode=x", "invalid_mode"),
    ],
)
async def test_parameters_that_cannot_be_served_are_refused(query, code):
    async with serving() as served, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{served.url}/v1/pcm?{query}") as ws:
            error = json.loads((await ws.receive()).data)
            assert error["code"] == code
            assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1003
        assert served.hub.metrics.sessions_total == 0
