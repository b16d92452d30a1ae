"""Both websocket endpoints under the server's limits, over real sockets: the session limit,
oversized messages, idle clients, a client that never reads, and clients that vanish mid-reply
(every task of theirs ends; no thread is left behind)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading
import time

import aiohttp
import numpy as np
import pytest
from web_fakes import FakeEngine, Served, b64, pcm, serving, speech

import web.websocket
from voice.settings import Settings

LONG_REPLY = [f" word{i}" for i in range(200)]  # 20 s of audio


def limited(reply: list[str] | None = None, **server: object) -> FakeEngine:
    settings = Settings()
    for name, value in server.items():
        setattr(settings.server, name, value)
    return FakeEngine(settings, reply or LONG_REPLY)


async def first_json(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict:
    async with asyncio.timeout(5):
        while True:
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
            if message.type is aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == kind:
                return json.loads(message.data)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict], str]:
    """Read to the close: the JSON events on the way, and the close frame's reason."""
    events = []
    async with asyncio.timeout(5):
        while (message := await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
            assert message.type is not aiohttp.WSMsgType.CLOSED, "closed with no close frame"
            if message.type is aiohttp.WSMsgType.TEXT:
                events.append(json.loads(message.data))
    return events, message.extra


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("path", ["/v1/realtime", "/v1/pcm"])
async def test_beyond_max_sessions_a_client_is_told_and_closed(path):
    async with serving(limited(max_sessions=1)) as served, aiohttp.ClientSession() as http:
        first = await http.ws_connect(f"{served.url}/v1/pcm")
        await first_json(first, "ready")
        second = await http.ws_connect(f"{served.url}{path}")
        events, reason = await closed(second)
        assert second.close_code == 1013 and reason == "session_limit_reached"
        (error,) = [e for e in events if e["type"] == "error"]
        assert error.get("code", error.get("error", {}).get("code")) == "session_limit_reached"
        await first.close()
        await until(lambda: served.hub.metrics.sessions_active == 0)
        third = await http.ws_connect(f"{served.url}{path}")  # room again
        assert (await third.receive()).type is aiohttp.WSMsgType.TEXT
        await third.close()
        assert served.hub.metrics.sessions_refused == {"session_limit_reached": 1}


async def test_an_oversized_message_gets_an_error_then_close_1009():
    engine = limited(max_message_bytes=4000, max_sessions=4)  # one closes as the next opens
    async with serving(engine) as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{served.url}/v1/realtime")
        await first_json(ws, "session.created")
        append = {"type": "input_audio_buffer.append", "audio": b64(speech(24000, 0.1, 0))}
        message = json.dumps(append)
        await ws.send_str(message)
        events, reason = await closed(ws)
        assert ws.close_code == 1009
        assert reason == f"message of {len(message)} bytes; the limit is 4000"
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "message_too_big"

        ws = await http.ws_connect(f"{served.url}/v1/pcm")
        await first_json(ws, "ready")
        await ws.send_bytes(bytes(4002))
        events, _ = await closed(ws)
        assert ws.close_code == 1009 and events[-1]["code"] == "message_too_big"

        ws = await http.ws_connect(f"{served.url}/v1/pcm")
        await first_json(ws, "ready")
        await ws.send_bytes(bytes(100_000))  # far past the limit: aiohttp refuses it itself
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1009
        await until(lambda: served.hub.metrics.sessions_active == 0)


async def test_a_client_that_sends_nothing_is_closed_after_the_idle_timeout():
    async with serving(limited(idle_timeout_s=0.3)) as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{served.url}/v1/realtime", autoping=True)
        started = time.monotonic()
        await ws.ping()  # pings are not messages: they do not keep a conversation open
        _, reason = await closed(ws)
        assert ws.close_code == 1000 and reason == "idle: no message for 0.3 s"
        assert 0.3 <= time.monotonic() - started < 1.5


def masked(opcode: int, payload: bytes) -> bytes:
    """One client-to-server websocket frame (clients must mask)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    key = np.resize(np.frombuffer(mask, np.uint8), size)
    return header + mask + (np.frombuffer(payload, np.uint8) ^ key).tobytes()


async def stalled_client(served: Served, path: str) -> socket.socket:
    """A websocket client with a tiny receive buffer that will never read a byte."""
    loop = asyncio.get_running_loop()
    host, port = served.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # the handshake only: not one frame after it
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_client_that_never_reads_is_closed_not_buffered(monkeypatch, caplog):
    monkeypatch.setattr(web.websocket, "CLOSE_TIMEOUT_S", 0.3)
    caplog.set_level("INFO", "web.websocket")
    async with serving(limited(), send_queue_bytes=16 * 1024) as served:
        sock = await stalled_client(served, "/v1/pcm?rate=48000")
        await asyncio.get_running_loop().sock_sendall(sock, masked(2, pcm(speech(48000))))
        await until(lambda: served.hub.metrics.sessions_active == 1)
        started = time.monotonic()
        await until(lambda: served.hub.metrics.sessions_active == 0, timeout=10)
        assert time.monotonic() - started < 6  # 20 s of reply: it did not wait for the end
        assert "closing (1008) client too slow: " in caplog.text
        sock.close()


async def baseline() -> tuple[set[asyncio.Task], set[threading.Thread]]:
    await asyncio.sleep(0.05)
    return asyncio.all_tasks(), set(threading.enumerate())


async def nothing_left(served: Served, tasks: set[asyncio.Task], threads: set) -> None:
    """Every task and thread that the connection brought is gone."""
    await until(lambda: served.hub.metrics.sessions_active == 0)
    await until(lambda: asyncio.all_tasks() <= tasks, timeout=3)
    assert set(threading.enumerate()) <= threads


async def test_a_client_gone_mid_reply_leaves_no_task_behind():
    async with serving(limited()) as served:
        async with aiohttp.ClientSession() as http, http.get(f"{served.url}/healthz"):
            pass  # any one-time machinery (resolver, connector) exists from here on
        tasks, threads = await baseline()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{served.url}/v1/realtime")
            await ws.send_str(
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(speech(24000))})
            )
            await first_json(ws, "response.output_audio.delta")
            await ws.close()
        await nothing_left(served, tasks, threads)

        async with aiohttp.ClientSession() as http:  # mid-turn, on the raw endpoint
            ws = await http.ws_connect(f"{served.url}/v1/pcm")
            await ws.send_bytes(pcm(speech(16000, 0.3, 0)))
            await first_json(ws, "speech_started")
            await ws.close()
        await nothing_left(served, tasks, threads)

        sock = await stalled_client(served, "/v1/pcm")  # the socket simply vanishes
        await asyncio.get_running_loop().sock_sendall(sock, masked(2, pcm(speech(16000))))
        await until(lambda: served.engine.sessions and served.engine.sessions[-1].busy)
        sock.close()
        await nothing_left(served, tasks, threads)


async def test_shutting_down_closes_every_conversation_with_1001():
    async with aiohttp.ClientSession() as http:
        async with serving(limited()) as served:
            ws = await http.ws_connect(f"{served.url}/v1/pcm")
            await first_json(ws, "ready")
            closing = asyncio.create_task(closed(ws))
        _, reason = await closing
        assert ws.close_code == 1001 and reason == "server shutting down"
