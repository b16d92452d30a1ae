"""`relayvoice eval latency --transport ws|webrtc`: the latency dialogues through a real server.

The benchmark starts ``relayvoice serve`` on a free loopback port, in a process of its own and
on the same settings (``--config``, ``--set`` and the environment are handed on), and talks to
it from this process as a client would: one connection per dialogue, the user's audio sent in
real time 20 ms at a time, the reply's audio received as it is played.

- ``ws``: ``/v1/pcm?rate=16000``, PCM16 both ways at the session's own rate, events as JSON.
  The plainest honest transport: the Realtime protocol would add base64 and 100 ms batches.
- ``webrtc``: an aiortc peer against ``POST /v1/webrtc/offer``, as the browser page does: the
  dialogue's audio (resampled to 48 kHz once, ahead of time, as a browser's microphone would
  deliver it) goes out as Opus on an audio track, the reply comes back on the remote track, the
  events over the "events" data channel (pinged every 2 s, as the page does).

Onset at the client runs from the moment the frame holding the turn's true end of speech was
sent to the first reply frame received that is not silent: a sample of at least
``SOUND_PEAK``, one step of PCM16. Between replies the server sends nothing (``/v1/pcm``) or
digital silence, which Opus gives back as exact zeros (WebRTC), and a paused reply sends
zeros. Piper begins a reply with 20-40 ms at about 3 steps (-80 dBFS): a threshold at what a
listener would notice would count the voice's lead-in as transport.

The server reports each finished reply's record (``turn_record`` on ``/v1/pcm``,
``turn_latency`` on the data channel) with the end of the user's speech on the server's
monotonic clock, which this process shares (CLOCK_MONOTONIC is system-wide on Linux), so each
turn's onset inside the session, from the same true end to the reply's first sample read from
the playout, is known as well. The difference is what the transport adds on the way out, per
turn (``transport_overhead_ms``). The way in counts in both onsets alike: audio that reaches
the session late makes every decision late.

Audio arrives in real time over a transport, so the replies are not fast-forwarded, and the
dialogues' barge-ins are not played: the turn before one is an ordinary turn, and the next
turn starts after its reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from fractions import Fraction
from typing import IO, Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from asr.stage import AsrModels
from eval.latency import (
    BETWEEN_TURNS_S,
    RATE,
    REPLY_CAP_S,
    ClientTimes,
    Dialogue,
    Microphone,
    TurnResult,
    assign,
    dialogues,
    settle_seconds,
    until,
)
from eval.report import progress
from voice.audio import float32_to_pcm16, resample
from voice.clock import Clock, RealClock
from voice.events import AudioFrame
from voice.session import TurnRecord
from voice.settings import RelayMode, Settings
from web.webrtc import OFFER_PATH, decode_audio_at_once
from web.webrtc import RATE as WEBRTC_RATE

HOST = "127.0.0.1"
SOUND_PEAK = 1 / 32768  # a frame whose largest sample reaches this is sound, not silence
SERVER_START_S = 300.0  # models load and warm up before /healthz answers
SERVER_STOP_S = 30.0  # SIGTERM, then this long to close its conversations, then SIGKILL
SESSION_END_S = 15.0  # a closed connection's session ends on the server within this (WebRTC: 10 s)
CONNECT_S = 30.0
PING_S = 2.0  # what the page does: the server drops a WebRTC peer silent for 10 s
LOG_TAIL_BYTES = 4000

Json = dict[str, Any]
Heard = tuple[float, float]  # clock time a reply frame was received, its peak in [0, 1]

log = logging.getLogger(__name__)


class ServerFailed(RuntimeError):
    """``relayvoice serve`` did not come up, or a connection to it failed."""


def peak(pcm: np.ndarray) -> float:
    """The largest magnitude among PCM16 samples, on the [0, 1] scale."""
    return float(np.abs(pcm.astype(np.int32)).max()) / 32768 if pcm.size else 0.0


def first_heard(
    heard: Sequence[Heard], since: float, threshold: float = SOUND_PEAK
) -> float | None:
    """When the first frame received at or after ``since`` with a peak of at least ``threshold``
    arrived (``heard`` in order of arrival), or None when none did."""
    start = bisect_left(heard, since, key=lambda h: h[0])
    return next((t for t, p in heard[start:] if p >= threshold), None)


def record_from_message(message: Json) -> TurnRecord | None:
    """The server's record of a finished reply (``turn_record`` or ``turn_latency``) back on the
    clock, or None when the user's end of speech, its origin, is unknown."""
    origin = message.get("speech_ended_at")
    if origin is None:
        return None
    nested: Json | None = message.get("ms")
    values: Json = {}
    for f in dataclasses.fields(TurnRecord):
        if f.name == "speech_ended_at":
            values[f.name] = origin
        elif f.name.endswith("_at"):
            name = f.name.removesuffix("_at")
            ms = nested.get(name) if nested is not None else message.get(f"{name}_ms")
            if ms is not None:
                values[f.name] = origin + ms / 1000
        elif f.name in message:
            values[f.name] = message[f.name]
    return TurnRecord(**values)


# --- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tail(log_file: IO[bytes]) -> str:
    log_file.seek(0, 2)
    log_file.seek(max(0, log_file.tell() - LOG_TAIL_BYTES))
    return log_file.read().decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    process: asyncio.subprocess.Process


@asynccontextmanager
async def serve(server_args: Sequence[str]) -> AsyncIterator[Server]:
    """``relayvoice serve`` on a free loopback port, until the block exits (SIGTERM); yields it
    once ``/healthz`` answers. Its log goes to a temporary file, shown if it fails."""
    port = free_port()
    command = [sys.executable, "-m", "voice.cli", *server_args]
    command += ["serve", "--host", HOST, "--port", str(port)]
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile() as log_file:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
        server = Server(url, process)
        try:
            await until_accepting(server)
            yield server
        except ServerFailed as exc:
            raise ServerFailed(f"{exc}\n--- the server's log ---\n{_tail(log_file)}") from None
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), SERVER_STOP_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def until_accepting(server: Server, within_s: float = SERVER_START_S) -> None:
    """Wait until ``/healthz`` says the server takes a new conversation: it has started, and
    (at ``server.max_sessions``) the last connection's session has ended, which the server
    learns a moment after the client closes it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            if server.process.returncode is not None:
                raise ServerFailed(f"relayvoice serve exited with {server.process.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{server.url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise ServerFailed(f"{server.url}/healthz did not answer 200 in {within_s:g} s")


# --- clients -----------------------------------------------------------------------------------


class Client(ABC):
    """One conversation with the server, seen from the client: the reply audio received, the
    records of finished replies and when each turn's end was announced."""

    rate: int  # of the audio sent

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.heard: list[Heard] = []
        self.records: list[TurnRecord] = []
        self.turns_ended: list[float] = []  # clock time each ``turn_ended`` event arrived
        self.errors: list[Json] = []  # the server's error events
        self.session_id: str | None = None
        self.closed: int | None = None  # the server's close code, once it closed
        self.ready = False

    @abstractmethod
    async def push(self, frame: AudioFrame) -> None:
        """Send one frame of the user's audio."""

    def on_message(self, message: Json) -> None:
        match message.get("type"):
            case "ready":
                self.ready, self.session_id = True, message.get("session_id")
            case "turn_ended":
                self.turns_ended.append(self.clock.now())
            case "turn_record" | "turn_latency":
                if (record := record_from_message(message)) is not None:
                    self.records.append(record)
            case "error":
                self.errors.append(message)
                log.warning("the server says: %s", message)

    def turn_ended_since(self, t: float) -> bool:
        return any(at >= t for at in self.turns_ended)

    def answered_since(self, t: float) -> bool:
        """A reply to a turn that ended at ``t`` or later has finished."""
        return any(r.turn_ended_at >= t for r in self.records)


class PcmClient(Client):
    """``/v1/pcm`` at 16 kHz."""

    rate = RATE

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, clock: Clock) -> None:
        super().__init__(clock)
        self._ws = ws

    async def push(self, frame: AudioFrame) -> None:
        await self._ws.send_bytes(float32_to_pcm16(frame.samples))

    def abort(self) -> None:
        """Vanish as a crashed client does: the connection reset, no close frame."""
        self._ws._writer.transport.abort()  # aiohttp has no public way to do this

    async def read(self) -> None:
        async for message in self._ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                pcm = np.frombuffer(message.data, dtype="<i2")
                self.heard.append((self.clock.now(), peak(pcm)))
            elif message.type is aiohttp.WSMsgType.TEXT:
                self.on_message(json.loads(message.data))
        self.closed = self._ws.close_code


@asynccontextmanager
async def pcm_client(url: str, mode: RelayMode, headers: dict[str, str]) -> AsyncIterator[Client]:
    clock = RealClock()
    endpoint = f"{url}/v1/pcm?rate={RATE}&mode={mode}"
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.ws_connect(endpoint) as ws,
    ):
        client = PcmClient(ws, clock)
        reader = asyncio.create_task(client.read())
        try:
            await until(clock, lambda: client.ready or reader.done(), CONNECT_S)
            if not client.ready:
                said = f": {client.errors[-1].get('message')}" if client.errors else ""
                raise ServerFailed(f"no ready event from {endpoint} in {CONNECT_S:g} s{said}")
            yield client
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


class MicrophoneTrack(MediaStreamTrack):
    """The microphone as an aiortc audio track: each frame pushed goes out as it comes."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._frames: asyncio.Queue[AudioFrame] = asyncio.Queue()
        self._pts = 0

    def put(self, frame: AudioFrame) -> None:
        self._frames.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        frame = await self._frames.get()
        pcm = np.frombuffer(float32_to_pcm16(frame.samples), dtype="<i2").reshape(1, -1)
        out = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        out.sample_rate, out.pts = frame.sample_rate, self._pts
        out.time_base = Fraction(1, frame.sample_rate)
        self._pts += pcm.shape[1]
        return out


class WebRtcClient(Client):
    """An aiortc peer, as the browser page is."""

    rate = WEBRTC_RATE

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.microphone = MicrophoneTrack()

    async def push(self, frame: AudioFrame) -> None:
        self.microphone.put(frame)

    async def listen(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.heard.append((self.clock.now(), peak(frame.to_ndarray())))


@asynccontextmanager
async def webrtc_client(
    url: str, mode: RelayMode, headers: dict[str, str]
) -> AsyncIterator[Client]:
    clock = RealClock()
    client = WebRtcClient(clock)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tasks: list[asyncio.Future[None]] = []
    pc.addTrack(client.microphone)
    channel = pc.createDataChannel("events")
    channel.on("message", lambda data: client.on_message(json.loads(data)))

    def on_track(track: MediaStreamTrack) -> None:
        # like a browser's adaptive buffer on loopback, not aiortc's fixed 80 ms
        decode_audio_at_once(pc, track)
        tasks.append(asyncio.ensure_future(client.listen(track)))

    pc.on("track", on_track)

    async def ping() -> None:
        while True:
            channel.send(json.dumps({"type": "ping"}))
            await asyncio.sleep(PING_S)

    try:
        await pc.setLocalDescription(await pc.createOffer())  # gathers the host candidates
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "mode": mode}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.post(f"{url}{OFFER_PATH}", json=offer) as response,
        ):
            answer = await response.json()
            if response.status != 200:
                raise ServerFailed(f"the offer was refused ({response.status}): {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        connected = await until(
            clock, lambda: client.ready and pc.connectionState == "connected", CONNECT_S
        )
        if not connected:
            raise ServerFailed(f"no WebRTC connection in {CONNECT_S:g} s ({pc.connectionState})")
        tasks.append(asyncio.ensure_future(ping()))
        yield client
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


Connect = Callable[[str, RelayMode, dict[str, str]], AbstractAsyncContextManager[Client]]
CLIENTS: dict[str, Connect] = {"ws": pcm_client, "webrtc": webrtc_client}


# --- replay ------------------------------------------------------------------------------------


async def run_dialogue(
    client: Client, dialogue: Dialogue, mode: RelayMode, settle_s: float
) -> list[TurnResult]:
    """``eval.latency.run_dialogue`` over a transport: each turn spoken in real time, its reply
    heard to the end, the next turn ``BETWEEN_TURNS_S`` later."""
    clock = client.clock
    mic = Microphone(client.push, clock, client.rate)
    speaking = asyncio.create_task(mic.run())
    results: list[TurnResult] = []
    try:
        for turn in dialogue.turns:
            started = mic.say(resample(turn.audio, RATE, client.rate))
            await asyncio.wait([started, speaking], return_when=asyncio.FIRST_COMPLETED)
            await until(clock, lambda: not mic.speaking or speaking.done(), 60)
            if speaking.done():  # the microphone could not send: the connection is gone
                speaking.result()
                raise ConnectionError("the microphone stopped")
            end_sent = mic.sent_at(turn.speech[1])
            if end_sent is None:
                raise TimeoutError("the turn's speech was not sent within 60 s")
            result = TurnResult(dialogue.id, mode, turn, started.result())
            results.append(result)
            result.client = ClientTimes(end_sent)
            if await until(clock, lambda t=end_sent: client.turn_ended_since(t), settle_s + 1):
                await until(clock, lambda t=end_sent: client.answered_since(t), REPLY_CAP_S)
            await clock.sleep(BETWEEN_TURNS_S)
    finally:
        speaking.cancel()
        await asyncio.gather(speaking, return_exceptions=True)
    assign(results, client.records)
    for result in results:
        if result.client is not None and result.reply is not None:
            since = result.reply.first_audio_out_at
            if since is not None:
                result.client.heard_at = first_heard(client.heard, since)
    return results


async def evaluate(
    settings: Settings,
    quick: bool,
    modes: Sequence[RelayMode],
    transport: str,
    server_args: Sequence[str],
) -> list[TurnResult]:
    """Every dialogue in every mode through a server in its own process, modes interleaved."""
    cases = dialogues(AsrModels(settings), settings, quick)  # before the server needs the CPU
    settle_s = settle_seconds(settings)
    connect = CLIENTS[transport]
    token = settings.server.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    results: list[TurnResult] = []
    async with serve(server_args) as server:
        url = server.url
        async with connect(url, modes[0], headers) as client:
            await run_dialogue(client, Dialogue("warm-up", cases[0].turns[:1]), modes[0], settle_s)
        total, n = len(cases) * len(modes), 0
        for dialogue in cases:
            for mode in modes:
                await until_accepting(server, SESSION_END_S)
                async with connect(url, mode, headers) as client:
                    results += await run_dialogue(client, dialogue, mode, settle_s)
                n += 1
                progress(n, total, f"{dialogue.id} {mode} ({transport})")
    return results
