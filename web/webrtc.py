"""The browser demo's transport: WebRTC audio both ways and an "events" data channel (aiortc).

Signalling is one JSON POST (``/v1/webrtc/offer``): the page sends its complete offer (ICE
gathered), the server answers with its own. No STUN or TURN server is configured, so only host
candidates are offered: the demo works offline, on a LAN or on one machine. Each peer holds one
hub ``Session`` for as long as it lives. The mic's Opus audio, decoded by aiortc at 48 kHz,
goes into the session as mono float32; the reply goes out through a track that reads the
session's playout 20 ms at a time on the real clock, which is what makes "read" mean "heard"
for interruptions and onset timing.

aiortc does not notice a peer that vanished (a closed laptop lid sends nothing), so the page
pings over the data channel every 2 s and a peer silent for ``PEER_TIMEOUT_S`` is closed, as is
one whose connection fails or closes; either way the session ends with it.

The "events" channel (opened by the page) carries JSON objects, each with a ``type``.
Page to server: ``ping`` (answered with ``pong``) and ``mode`` with ``mode`` relay, cascaded
or fast (answered with ``mode``). Server to page: ``ready`` (the session's ``mode``),
``state`` (the connection's), ``speech_started``, ``speech_stopped``, ``transcript_partial``
(``text``, ``committed``, ``tentative``), ``turn_ended`` (``transcript`` so far),
``transcript_final`` (the turn's ``text``), ``reply_text`` (``turn_id``, ``text``: a chunk of
the reply, sent when its audio starts playing), ``interrupted`` (``turn_id``, ``reason``,
``heard_text``), ``turn_latency`` (a finished reply: texts, verdict, ``gap_ms`` and ``ms``, its
timeline from the end of the user's speech, and that end, ``speech_ended_at``, in seconds of the
server's monotonic clock), ``error`` (``code``, ``message``, and ``stage``
for a stage's error) and ``closed`` (``reason``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from fractions import Fraction

import av
import numpy as np
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from voice.audio import AudioFormatError, StreamResampler, float32_to_pcm16
from voice.clock import Clock, wait_for
from voice.events import (
    AudioFrame,
    AudioOut,
    Event,
    Interrupted,
    SessionFailed,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
)
from voice.playout import Playout, PlayoutTurn
from voice.session import Session, TurnRecord
from voice.settings import RelayMode, Settings
from web import messages
from web.hub import Hub, Refused
from web.messages import MODES, Json

OFFER_PATH = "/v1/webrtc/offer"
RATE = 48000  # Opus's rate, in and out of aiortc: the transport resamples nothing
FRAME_S = 0.02
FRAME_SAMPLES = round(RATE * FRAME_S)
PEER_TIMEOUT_S = 10.0  # no data-channel message this long (the page pings every 2 s): gone
MAX_LAG_S = 0.1  # the reply track this far behind (a stalled loop) restarts its pacing

log = logging.getLogger(__name__)


def add_routes(app: web.Application, hub: Hub, settings: Settings) -> None:
    """Mount the offer endpoint on ``app``; every peer is closed when the app shuts down."""
    peers = Peers(hub, settings)
    app.router.add_post(OFFER_PATH, peers.offer)
    app.on_shutdown.append(peers.shutdown)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class BadOffer(ValueError):
    """The offer request cannot be used; the message says why (HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_offer(body: bytes) -> tuple[str, RelayMode | None]:
    """The offer's SDP and requested mode, or ``BadOffer`` saying what is wrong."""
    try:
        request = messages.parse(body)
    except messages.BadJson as exc:
        raise BadOffer("invalid_json", str(exc)) from None
    if not isinstance(request, dict):
        raise BadOffer("invalid_request", 'expected an object {"sdp", "type", "mode"}')
    sdp, kind, mode = request.get("sdp"), request.get("type"), request.get("mode")
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadOffer("invalid_request", '"sdp" must be the offer\'s SDP text')
    if kind != "offer":
        raise BadOffer("invalid_request", f'"type" must be "offer", got {kind!r}')
    if mode is not None and mode not in MODES:
        raise BadOffer("invalid_mode", f'"mode" must be one of {", ".join(MODES)}; got {mode!r}')
    try:
        kinds = [media.kind for media in SessionDescription.parse(sdp).media]
    except Exception as exc:  # aiortc's parser fails in many ways on malformed text
        raise BadOffer("invalid_sdp", f"the offer's SDP cannot be parsed ({exc!r})") from None
    if "audio" not in kinds:
        raise BadOffer("no_audio", "the offer has no audio section: add the microphone track")
    return sdp, mode


def mono_float32(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame (any layout, 16-bit or float, packed or planar) as mono float32."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    elif data.dtype.kind != "f":
        raise AudioFormatError(f"cannot use {frame.format.name} audio from the browser")
    return data.astype(np.float32, copy=False).mean(axis=0)


def event_message(event: Event) -> Json | None:
    """What the page is told about a session event (None: nothing it shows)."""
    match event:
        case SpeechStarted() | SpeechEnded():
            return messages.speech(event)
        case TranscriptPartial():
            return messages.transcript_partial(event, text=event.text)
        case TurnEnded():
            return messages.turn_ended(event)
        case TurnTranscript():
            return messages.transcript_final(event.transcript)
        case Interrupted():
            return messages.interrupted(event)
        case StageError():
            return messages.error("stage_error", event.message, stage=event.stage)
        case SessionFailed():
            return messages.error("session_failed", event.reason)
    return None


def latency_message(record: TurnRecord) -> Json:
    """A finished reply's timeline in ms from the user's end of speech (None: did not happen)."""
    return {
        "type": "turn_latency",
        "turn_id": record.turn_id,
        "mode": record.mode,
        "verdict": record.verdict,
        "user_text": record.user_text,
        "prefix_text": record.prefix_text,
        "reply_text": record.reply_text,
        "heard_text": record.heard_text,
        "interruption": record.interruption,
        "gap_ms": round(record.gap_ms, 1),
        "speech_ended_at": record.speech_ended_at,  # for a peer on the same machine
        "ms": {
            "turn_ended": record.ms_after_speech(record.turn_ended_at),
            "first_text": record.ms_after_speech(record.first_text_at),
            "first_tts_audio": record.ms_after_speech(record.first_tts_audio_at),
            "first_audio_out": record.ms_after_speech(record.first_audio_out_at),
            "continuation_audio_out": record.ms_after_speech(record.continuation_audio_out_at),
        },
    }


class PlayoutTrack(MediaStreamTrack):
    """The reply as a WebRTC audio track: 20 ms of the playout per ``recv``, paced on the clock.

    ``on_read`` gets the reply that was playing before each read (or None), so that the peer
    can tell the page which words have just started to sound."""

    kind = "audio"

    def __init__(
        self, playout: Playout, clock: Clock, on_read: Callable[[PlayoutTurn | None], None]
    ) -> None:
        super().__init__()
        self._playout, self._clock, self._on_read = playout, clock, on_read
        self._deadline: float | None = None
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock.now()
        if self._deadline is None or now - self._deadline > MAX_LAG_S:
            self._deadline = now
        else:
            await self._clock.sleep_until(self._deadline)
        self._deadline += FRAME_S
        turn = self._playout.turn
        samples = self._playout.read(FRAME_SAMPLES)
        self._on_read(turn)
        pcm = np.frombuffer(float32_to_pcm16(samples), dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts, frame.time_base = self._pts, Fraction(1, RATE)
        self._pts += FRAME_SAMPLES
        return frame


class AudioJitterBuffer(JitterBuffer):
    """Hands on each audio packet the moment it arrives.

    aiortc's buffer finds where a frame ends by waiting for the next packet's timestamp, and
    keeps four frames besides (80 ms in all), so the end of the user's speech reached the VAD
    that much later, and the first packet of a reply was heard 20 ms late. An Opus RTP packet
    is always one whole frame, so nothing needs to wait. The receiver takes at most one frame
    per packet received, so a packet that comes late cannot be played later without delaying
    every packet after it for good: it is dropped (base class), as a lost one would be."""

    def __init__(self) -> None:
        super().__init__(capacity=16)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None  # add() has set it
        newest = None
        for offset in range(self.capacity):
            if self._packets[(self._origin + offset) % self.capacity] is not None:
                newest = offset
        if newest is None:
            return None
        packet = self._packets[(self._origin + newest) % self.capacity]
        assert packet is not None
        self.remove(newest + 1)  # with the gaps before it: those packets come too late now
        return JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


def decode_audio_at_once(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    """Give ``track``'s receiver an ``AudioJitterBuffer``. aiortc has no setting for its
    buffer: this replaces the receiver's private one, before any packet has arrived."""
    for transceiver in pc.getTransceivers():
        if transceiver.receiver.track is track:
            buffer = AudioJitterBuffer()
            transceiver.receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


class Peer:
    """One browser: its peer connection, its session and the events channel between them."""

    def __init__(self, hub: Hub, stack: AsyncExitStack) -> None:
        self._clock = hub.clock
        self._stack = stack  # holds the hub's session open until the peer ends
        self.session: Session | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._channel: RTCDataChannel | None = None
        self._outbox: list[Json] = []  # said before the channel opened
        self._last_seen = self._clock.now()
        self._ended = asyncio.Event()
        self._end_reason = ""
        self._listeners: list[asyncio.Task[None]] = []
        self._chunks: deque[tuple[int, int, str]] = deque()  # turn, index, text: not yet heard
        self._chunk_counts: dict[int, int] = {}
        self._records_sent = 0
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    def attach(self, session: Session) -> None:
        self.session = session
        self.pc.addTrack(PlayoutTrack(session.playout, self._clock, self._after_read))

    # --- lifetime ------------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        if not self._ended.is_set():
            self._end_reason = reason
            self._ended.set()

    async def run(self) -> None:
        """Live until the peer goes quiet, its connection fails or closes, or the server stops;
        then close the connection and end the session."""
        try:
            while not self._ended.is_set():
                quiet = self._clock.now() - self._last_seen
                if quiet >= PEER_TIMEOUT_S:
                    self.end(f"no message from the page in {PEER_TIMEOUT_S:g} s")
                    break
                with suppress(TimeoutError):
                    await wait_for(self._clock, self._ended.wait(), PEER_TIMEOUT_S - quiet)
        finally:
            await self.close()

    async def close(self) -> None:
        log.info("webrtc peer closed: %s", self._end_reason or "closed")
        self._send({"type": "closed", "reason": self._end_reason})
        await self.pc.close()
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        await self._stack.aclose()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        self._send({"type": "state", "state": state})
        if state in ("failed", "closed"):
            self.end(f"connection {state}")

    # --- audio in ----------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            decode_audio_at_once(self.pc, track)
            self._listeners.append(asyncio.ensure_future(self._listen(track)))

    async def _listen(self, track: MediaStreamTrack) -> None:
        assert self.session is not None
        resampler: StreamResampler | None = None
        try:
            while True:
                frame = await track.recv()
                samples = mono_float32(frame)
                if frame.sample_rate != RATE:  # a codec other than Opus was negotiated
                    if resampler is None or resampler.from_rate != frame.sample_rate:
                        resampler = StreamResampler(frame.sample_rate, RATE)
                    samples = resampler.process(samples)
                await self.session.push(
                    AudioFrame(t=self._clock.now(), samples=samples, sample_rate=RATE)
                )
        except MediaStreamError:
            self.end("the microphone track ended")
        except Exception as exc:  # unusable audio, or the pipeline failed on it: hang up
            log.exception("webrtc audio input failed")
            self._send(messages.error("audio_input_failed", str(exc)))
            self.end(f"audio input failed: {exc}")

    # --- events to the page --------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """The session's observer: tell the page, and note reply chunks until they sound."""
        if isinstance(event, AudioOut):
            self._queued(event)
        elif isinstance(event, Interrupted):
            self._drop_unheard()
        elif isinstance(event, SessionFailed):
            self.end(event.reason)
        if (message := event_message(event)) is not None:
            self._send(message)
        self._send_records()

    def _queued(self, chunk: AudioOut) -> None:
        """Mirror the playout's queue (the session enqueued the chunk iff its reply plays)."""
        assert self.session is not None
        turn = self.session.playout.turn
        if turn is None or turn.turn_id != chunk.turn_id:
            return
        index = self._chunk_counts.get(chunk.turn_id, 0)
        self._chunk_counts = {chunk.turn_id: index + 1}
        self._chunks.append((chunk.turn_id, index, chunk.text))

    def _after_read(self, turn: PlayoutTurn | None) -> None:
        """Send the text of every chunk whose audio has just begun, then any finished reply."""
        if turn is not None:
            started = len(turn.chunk_started_at)
            while self._chunks and self._chunks[0][0] == turn.turn_id:
                turn_id, index, text = self._chunks[0]
                if index >= started:
                    break
                self._chunks.popleft()
                if text.strip():
                    self._send(messages.reply_text(turn_id, text))
        self._drop_unheard()
        self._send_records()

    def _drop_unheard(self) -> None:
        """Chunks of a reply that is no longer playing were stopped before they sounded."""
        assert self.session is not None
        turn = self.session.playout.turn
        current = None if turn is None else turn.turn_id
        while self._chunks and self._chunks[0][0] != current:
            self._chunks.popleft()

    def _send_records(self) -> None:
        if self.session is None:
            return
        for record in self.session.records[self._records_sent :]:
            self._send(latency_message(record))
        self._records_sent = len(self.session.records)

    def _send(self, message: Json) -> None:
        if self._channel is None or self._channel.readyState != "open":
            if not self._ended.is_set():
                self._outbox.append(message)
            return
        self._channel.send(json.dumps(message))

    # --- messages from the page ----------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != "events":
            return
        self._channel = channel
        self._last_seen = self._clock.now()
        channel.on("message", self._on_message)
        assert self.session is not None
        self._send({"type": "ready", "session_id": self.session.id, "mode": self.session.mode})
        outbox, self._outbox = self._outbox, []
        for message in outbox:
            self._send(message)

    def _on_message(self, data: str | bytes) -> None:
        assert self.session is not None
        self._last_seen = self._clock.now()
        try:
            message = messages.parse(data)
            kind = message["type"]  # type: ignore[index]
        except (messages.BadJson, TypeError, KeyError):
            self._send(messages.error("bad_message", "expected JSON"))
            return
        if kind == "ping":
            self._send({"type": "pong"})
        elif kind == "mode" and message.get("mode") in MODES:
            self.session.set_mode(message["mode"])
            self._send(messages.mode(self.session.mode))
        else:
            self._send(
                messages.error(
                    "bad_message",
                    f"unknown message {str(data)[:200]!r}; "
                    f"expected ping, or mode with one of {', '.join(MODES)}",
                )
            )


class Peers:
    """The offer endpoint and every live peer."""

    def __init__(self, hub: Hub, settings: Settings) -> None:
        self._hub = hub
        self._max_body = settings.server.max_message_bytes
        self._running: set[asyncio.Task[None]] = set()
        self._peers: set[Peer] = set()

    async def offer(self, request: web.Request) -> web.Response:
        """``{"sdp", "type": "offer", "mode"?}`` in, the answer ``{"sdp", "type"}`` out."""
        if (request.content_length or 0) > self._max_body:
            return _error(413, "too_large", f"an offer is at most {self._max_body} bytes")
        try:
            sdp, mode = parse_offer(await request.read())
        except BadOffer as exc:
            return _error(400, exc.code, str(exc))
        stack = AsyncExitStack()
        try:
            peer = Peer(self._hub, stack)
            stack.push_async_callback(peer.pc.close)
            session = await stack.enter_async_context(
                self._hub.session(RATE, RATE, mode, peer.observe, transport="webrtc")
            )
            peer.attach(session)
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())  # gathers ICE
        except Refused as exc:
            await stack.aclose()
            return _error(503, exc.code, str(exc))
        except (ValueError, InvalidAccessError, InvalidStateError) as exc:
            await stack.aclose()
            return _error(400, "invalid_sdp", f"the offer cannot be used: {exc}")
        except BaseException:
            await stack.aclose()
            raise
        self._start(peer)
        answer = peer.pc.localDescription
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    def _start(self, peer: Peer) -> None:
        self._peers.add(peer)
        task = asyncio.ensure_future(peer.run())
        self._running.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._peers.discard(peer)
            if not task.cancelled() and task.exception() is not None:
                log.error("webrtc peer failed", exc_info=task.exception())

        task.add_done_callback(done)

    async def shutdown(self, app: web.Application) -> None:
        for peer in self._peers:
            peer.end("the server is shutting down")
        await asyncio.gather(*self._running, return_exceptions=True)
