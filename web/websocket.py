"""What both websocket endpoints share: limits on what comes in, a bounded queue for what goes
out, and one conversation's life from admission to the last task it owns.

Out: one task writes a connection's messages in order. A client that stops reading makes that
task wait on the socket, so the queue in front of it is bounded (``send_queue_bytes``); when it
is full the client is too slow to follow a real-time conversation and the connection is closed
(1008) instead of holding ever more audio for it. The kernel's send buffer is capped as well
(``KERNEL_SEND_BUFFER``): left to autotuning it grows to megabytes, a minute of reply audio
that the playout counts as heard while nobody has received it.

In: a message larger than ``server.max_message_bytes`` gets an ``error`` event and close 1009
(aiohttp itself refuses one past twice that, closing with 1009 before the event could be sent,
so memory stays bounded either way); a connection with no message for
``server.idle_timeout_s`` is closed (1000) with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

import numpy as np
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from voice.events import Event, SessionFailed
from voice.session import Session
from voice.settings import RelayMode, ServerSettings, Settings
from web.hub import Hub, Refused

HUB = web.AppKey("hub", Hub)
SETTINGS = web.AppKey("settings", Settings)
SEND_QUEUE_BYTES = web.AppKey("send_queue_bytes", int)
LINKS = web.AppKey("links", set["Link"])

KERNEL_SEND_BUFFER = 64 * 1024  # Linux doubles it: ~2 s of base64 24 kHz audio in flight
CLOSE_TIMEOUT_S = 2.0  # a client that does not take the close frame is cut off after this
MAX_REASON_BYTES = 123  # the most a close frame's reason may hold (RFC 6455)

log = logging.getLogger(__name__)


class Link:
    """One websocket: bounded sending, limited receiving, one orderly close."""

    def __init__(
        self,
        request: web.Request,
        server: ServerSettings,
        queue_bytes: int,
        protocols: tuple[str, ...] = (),
    ) -> None:
        self._request = request
        self._max_message = server.max_message_bytes
        self._idle_s = server.idle_timeout_s
        self._queue_bytes = queue_bytes
        self.ws = web.WebSocketResponse(
            protocols=protocols, max_msg_size=2 * server.max_message_bytes
        )
        self._queue: deque[str | bytes] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False  # nothing more is queued
        self._close_started = False
        self._closed = asyncio.Event()
        self._last_message = 0.0

    async def open(self) -> None:
        self._transport = self._request.transport  # kept: aiohttp forgets it once closing
        if self._transport is not None:
            sock = self._transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
        await self.ws.prepare(self._request)
        self._writer = asyncio.create_task(self._write())
        self._last_message = asyncio.get_running_loop().time()

    def send(self, message: str | bytes) -> None:
        """Queue ``message``; a client this far behind is closed instead (see the module)."""
        if self._closing:
            return
        if self._queued + len(message) > self._queue_bytes:
            self._closing = True
            reason = f"client too slow: {self._queued} bytes unread"
            self._closer = asyncio.create_task(
                self.close(WSCloseCode.POLICY_VIOLATION, reason, flush=False)
            )
            return
        self._queue.append(message)
        self._queued += len(message)
        self._empty.clear()
        self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._empty.set()
                    self._wake.clear()
                    await self._wake.wait()
                message = self._queue.popleft()
                self._queued -= len(message)
                if isinstance(message, str):
                    await self.ws.send_str(message)
                else:
                    await self.ws.send_bytes(message)
        except ConnectionError:  # the client is gone; receive() sees it too
            self._closing = True
            self._empty.set()

    async def receive(self, too_big: Callable[[str], None]) -> WSMessage | None:
        """The next text or binary message, or None once the conversation is over: the client
        closed, went quiet for too long, or sent a message too big (``too_big`` gets the
        explanation first, to send as an error event); each is closed here with its reason."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            left = self._last_message + self._idle_s - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    message = await self.ws.receive()  # pings are answered inside
            except TimeoutError:
                await self.close(WSCloseCode.OK, f"idle: no message for {self._idle_s:g} s")
                return None
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return None  # a close, or a frame aiohttp refused (it has closed already)
            size = len(message.data.encode() if isinstance(message.data, str) else message.data)
            if size > self._max_message:
                explanation = f"message of {size} bytes; the limit is {self._max_message}"
                too_big(explanation)
                await self.close(WSCloseCode.MESSAGE_TOO_BIG, explanation)
                return None
            self._last_message = loop.time()
            return message
        return None

    async def close(self, code: int, reason: str, flush: bool = True) -> None:
        """Close with ``code`` and ``reason``; with ``flush`` the messages already queued go
        first (an error event before its close), within ``CLOSE_TIMEOUT_S``.

        The writer is not cancelled while it may wait for the socket: aiohttp's senders share
        one drain future, and cancelling one waiter cancels it for the close frame too.
        A second call waits for the first to finish."""
        if self._close_started:
            await self._closed.wait()
            return
        self._close_started = self._closing = True
        log.info("%s %s: closing (%d) %s", self._request.remote, self._request.path, code, reason)
        if flush:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._empty.wait()
        self._queue.clear()
        self._queued = 0
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason.encode()[:MAX_REASON_BYTES])
        except TimeoutError:  # it does not read: not even the close frame gets through
            if self._transport is not None:
                self._transport.abort()
        finally:
            self._closed.set()
        await self._stop_writer()

    async def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def finish(self) -> None:
        """The conversation is over: close if nobody has, and end every task of this link."""
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)
        if self._close_started or not self.ws.closed:
            await self.close(WSCloseCode.OK, "conversation ended")
        await self._stop_writer()


class Conversation(ABC):
    """One websocket client and the session it talks to; a subclass speaks the protocol."""

    frame_s: float  # how much of the playout each read takes (and each audio message holds)
    protocols: tuple[str, ...] = ()
    transport: str  # the name transcripts give it

    def __init__(self, request: web.Request, input_rate: int, output_rate: int) -> None:
        app = request.app
        self.hub = app[HUB]
        self.settings = app[SETTINGS]
        self.input_rate, self.output_rate = input_rate, output_rate
        self.mode: RelayMode | None = None
        self.link = Link(request, self.settings.server, app[SEND_QUEUE_BYTES], self.protocols)
        self._links = app[LINKS]
        self._session: Session | None = None
        self._hang_up: asyncio.Task[None] | None = None

    @property
    def session(self) -> Session:
        assert self._session is not None, "no session before admission"
        return self._session

    @abstractmethod
    def error(self, code: str, message: str) -> None:
        """Tell the client what went wrong, in the protocol's ``error`` event."""

    @abstractmethod
    def observe(self, event: Event) -> None:
        """The session's observer: translate its events into the protocol's."""

    @abstractmethod
    def play(self, samples: np.ndarray) -> None:
        """One read of the playout (``frame_s`` of audio, reply or silence), on the clock."""

    @abstractmethod
    async def handle(self, message: WSMessage) -> None:
        """One text or binary message from the client."""

    @abstractmethod
    def started(self) -> None:
        """The session exists: greet the client."""

    def refusal(self) -> tuple[str, str] | None:
        """(code, message) when the request's parameters cannot be served."""
        return None

    async def run(self) -> web.WebSocketResponse:
        """Open, admit, converse until the client leaves, and end every task on the way out
        (the hub's context closes the session)."""
        await self.link.open()
        self._links.add(self.link)
        try:
            if (refused := self.refusal()) is not None:
                self.error(*refused)
                await self.link.close(WSCloseCode.UNSUPPORTED_DATA, refused[1])
                return self.link.ws
            async with self.hub.session(
                self.input_rate, self.output_rate, self.mode, self._observe, self.transport
            ) as session:
                self._session = session
                await self._converse(session)
        except Refused as exc:
            self.error(exc.code, str(exc))
            await self.link.close(WSCloseCode.TRY_AGAIN_LATER, exc.code)
        finally:
            self._links.discard(self.link)
            if self._hang_up is not None:
                await asyncio.gather(self._hang_up, return_exceptions=True)
            await self.link.finish()
        return self.link.ws

    def _observe(self, event: Event) -> None:
        self.observe(event)
        if isinstance(event, SessionFailed):  # too many failed replies: hang up, saying why
            self.error("session_failed", event.reason)
            self._hang_up = asyncio.create_task(
                self.link.close(WSCloseCode.INTERNAL_ERROR, event.reason)
            )

    async def _converse(self, session: Session) -> None:
        self.started()
        player = asyncio.create_task(session.playout.run(self.play, self.frame_s))
        try:
            while (message := await self.link.receive(self._too_big)) is not None:
                await self.handle(message)
        finally:
            player.cancel()
            await asyncio.gather(player, return_exceptions=True)

    def _too_big(self, explanation: str) -> None:
        self.error("message_too_big", explanation)


def is_reply_audio(session: Session, samples: np.ndarray) -> bool:
    """Whether a frame just read from the playout belongs to a reply that has begun to sound
    (its audio, a late chunk's gap or a pause over the user's speech) rather than the silence
    between replies, which is not sent."""
    turn = session.playout.turn
    return (turn is not None and turn.first_audio_at is not None) or bool(samples.any())
