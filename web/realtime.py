"""``/v1/realtime``: the OpenAI Realtime API (GA event names) over a websocket, so that the
official SDKs talk to relayvoice unchanged (``AsyncOpenAI(base_url="http://HOST:PORT/v1")``,
then ``client.realtime.connect(model=...)``).

Audio is ``audio/pcm`` at 24 kHz both ways (PCM16 mono, base64 in JSON). How relayvoice's
session maps onto the protocol:

- Turn detection is always the server's: relayvoice's end-of-turn detector (voice activity,
  intonation and wording) is the point of the engine, so ``turn_detection: null`` is refused
  and ``input_audio_buffer.commit`` only acknowledges the speech heard so far. The user's item
  opens at the first ``speech_started`` of a turn (each pause inside the turn gives a
  ``speech_stopped`` and a new ``speech_started`` with the same item id) and is committed when
  the turn ends. Audio is consumed as it arrives, so ``input_audio_buffer.clear`` has nothing
  to drop and only acknowledges.
- Transcription deltas carry committed words only (they never change); the ``completed``
  event carries the turn's final transcript.
- A response exists from the end of the turn until its audio has been read from the session's
  playout, in real time, ``DELTA_S`` per ``response.output_audio.delta``: what is read counts
  as heard when the user interrupts. The audio transcript arrives chunk by chunk as each
  chunk begins to sound. ``response.done`` follows the last audio, ``completed``, or
  ``cancelled`` (``turn_detected`` for a barge-in, ``client_cancelled`` for
  ``response.cancel``) with the transcript cut to the words heard, which is also what the
  conversation keeps.
- ``session.update`` validates the audio formats, turn detection and modalities and answers
  ``session.updated`` with the effective configuration; the other fields (instructions,
  voice, tools) are relayvoice's own settings and are reported, not changed.
- Events that need a model conversation relayvoice does not keep (``response.create``,
  ``conversation.item.*``, ``output_audio_buffer.clear``) get an ``unsupported_event`` error.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMessage, WSMsgType, web

from voice.audio import AudioFormatError, float32_to_pcm16, pcm16_to_float32
from voice.events import (
    AudioFrame,
    AudioOut,
    Event,
    Interrupted,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
)
from voice.playout import PlayoutTurn
from web.messages import BadJson, Json, brief, parse
from web.websocket import Conversation, is_reply_audio

RATE = 24000
DELTA_S = 0.02  # audio per delta: one read of the playout, as often as a WebRTC packet
FORMAT = {"type": "audio/pcm", "rate": RATE}
UNSUPPORTED = (
    "response.create",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "output_audio_buffer.clear",
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def ms(seconds: float) -> int:
    return round(seconds * 1000)


class ClientError(Exception):
    """A client event that cannot be used: becomes an ``error`` event naming it."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class _UserTurn:
    """The user's item: from the first speech of a turn until the turn's final transcript."""

    id: str
    start_s: float | None = None  # where its speech began and ended in the input stream
    end_s: float | None = None
    finals: list[str] = field(default_factory=list)  # per speech segment
    open_segments: int = 0  # speech ended, its final transcript not yet back
    sent: str = ""  # transcription deltas so far
    committed: bool = False  # input_audio_buffer.committed sent


@dataclass
class _Response:
    id: str
    item_id: str
    previous_item_id: str | None
    turn_id: int
    playing: PlayoutTurn
    texts: deque[str] = field(default_factory=deque)  # its chunks' text, not yet sounding
    sent_chunks: int = 0  # chunks whose text has gone out
    transcript: str = ""  # the text of the chunks that have begun to sound
    cancel_reason: str | None = None


def _table(value: object, param: str) -> Json:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError("invalid_value", f"{param} must be an object", param)
    return value


def _check_format(value: object, param: str) -> None:
    audio = _table(value, param)
    if audio.get("type", "audio/pcm") != "audio/pcm" or audio.get("rate", RATE) != RATE:
        raise ClientError(
            "unsupported_audio_format",
            f"relayvoice takes and sends audio/pcm at {RATE} Hz (PCM16 mono); got {brief(value)}",
            param,
        )


class Realtime(Conversation):
    frame_s = DELTA_S
    transport = "realtime"
    protocols = ("realtime",)  # the OpenAI JavaScript SDK offers it; browsers need an echo

    def __init__(self, request: web.Request) -> None:
        super().__init__(request, RATE, RATE)
        self._model = request.query.get("model", "relayvoice")
        self._conversation_id = new_id("conv")
        self._user: _UserTurn | None = None  # speech heard, the turn not yet ended
        self._transcribing: deque[_UserTurn] = deque()  # ended, final transcript to come
        self._late_finals = 0  # finals still due to turns already committed
        self._response: _Response | None = None
        self._answered = 0  # the session's last reply (turn id)
        self._last_item: str | None = None

    def send(self, kind: str, **fields: Any) -> None:
        self.link.send(json.dumps({"type": kind, "event_id": new_id("event"), **fields}))

    def error(
        self,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        error = {"type": kind, "code": code, "message": message, "param": param}
        self.send("error", error={**error, "event_id": event_id})

    def started(self) -> None:
        self.send("session.created", session=self._config())

    def _config(self) -> Json:
        """The effective session, in the GA ``RealtimeSessionCreateRequest`` shape."""
        settings = self.settings
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": f"sess_{self.session.id}",  # the id `relayvoice sessions export` takes
            "model": self._model,
            "output_modalities": ["audio"],
            "instructions": settings.llm.system_prompt,
            "max_output_tokens": settings.llm.max_reply_tokens,
            "audio": {
                "input": {
                    "format": FORMAT,
                    "transcription": {
                        "model": settings.asr.model,
                        "language": settings.asr.language,
                    },
                    "noise_reduction": None,
                    "turn_detection": {
                        "type": "semantic_vad",
                        "create_response": True,
                        "interrupt_response": True,
                    },
                },
                "output": {"format": FORMAT, "voice": settings.tts.voice, "speed": 1.0},
            },
        }

    # --- client events -------------------------------------------------------------------------

    async def handle(self, message: WSMessage) -> None:
        if message.type is WSMsgType.BINARY:
            self.error("invalid_event", "the Realtime API sends JSON events as text messages")
            return
        event_id = None
        try:
            event = parse(message.data)
            if not isinstance(event, dict):
                raise ClientError("invalid_event", 'an event is a JSON object with a "type"')
            if isinstance(event.get("event_id"), str):
                event_id = event["event_id"]
            await self._dispatch(event)
        except BadJson as exc:
            self.error("invalid_json", str(exc))
        except ClientError as exc:
            self.error(exc.code, str(exc), exc.param, event_id)

    async def _dispatch(self, event: Json) -> None:
        kind = event.get("type")
        if kind == "session.update":
            self._update(event)
        elif kind == "input_audio_buffer.append":
            await self._append(event)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self.send("input_audio_buffer.cleared")
        elif kind == "response.cancel":
            self._cancel(event)
        elif kind in UNSUPPORTED:
            raise ClientError(
                "unsupported_event",
                f"{kind} is not supported: relayvoice answers each turn it detects, from "
                "its own conversation history",
                "type",
            )
        else:
            raise ClientError("unknown_event", f"unknown event type {brief(kind)}", "type")

    def _update(self, event: Json) -> None:
        session = _table(event.get("session"), "session")
        if session.get("type", "realtime") != "realtime":
            raise ClientError(
                "unsupported_value", "only realtime sessions are served", "session.type"
            )
        if session.get("output_modalities", ["audio"]) != ["audio"]:
            raise ClientError(
                "unsupported_value",
                "relayvoice always answers in audio (with its transcript)",
                "session.output_modalities",
            )
        audio = _table(session.get("audio"), "session.audio")
        for side in ("input", "output"):
            config = _table(audio.get(side), f"session.audio.{side}")
            if "format" in config:
                _check_format(config["format"], f"session.audio.{side}.format")
        heard = _table(audio.get("input"), "session.audio.input")
        if "turn_detection" in heard and heard["turn_detection"] is None:
            raise ClientError(
                "unsupported_value",
                "relayvoice always detects the end of the user's turn itself",
                "session.audio.input.turn_detection",
            )
        self.send("session.updated", session=self._config())

    async def _append(self, event: Json) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("invalid_value", "audio must be base64 text", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except ValueError as exc:  # binascii.Error, or text that is not ASCII
            raise ClientError(
                "invalid_base64", f"audio is not valid base64: {exc}", "audio"
            ) from None
        if not pcm or len(pcm) % 2:
            raise ClientError(
                "invalid_audio",
                f"audio must be PCM16: a positive, even number of bytes; got {len(pcm)}",
                "audio",
            )
        frame = AudioFrame(t=self.hub.clock.now(), samples=pcm16_to_float32(pcm), sample_rate=RATE)
        try:
            await self.session.push(frame)
        except AudioFormatError as exc:
            raise ClientError("invalid_audio", str(exc), "audio") from None

    def _commit(self) -> None:
        if self._user is None:
            raise ClientError(
                "input_audio_buffer_commit_empty", "no speech since the last turn to commit"
            )
        if not self._user.committed:
            self._committed(self._user)

    def _cancel(self, event: Json) -> None:
        self._check_finished()
        response = self._response
        if response is None or event.get("response_id", response.id) != response.id:
            raise ClientError("response_cancel_not_active", "no such response in progress")
        self.session.interrupt("cancel")

    # --- session events ------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        match event:
            case SpeechStarted():
                user = self._user = self._user or _UserTurn(new_id("item"), event.audio_time)
                self.send(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=ms(event.audio_time),
                    item_id=user.id,
                )
            case SpeechEnded():
                user = self._user = self._user or _UserTurn(new_id("item"))
                user.end_s, user.open_segments = event.audio_time, user.open_segments + 1
                self.send(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=ms(event.audio_time),
                    item_id=user.id,
                )
            case TranscriptPartial():
                self._transcribed(event.committed)
            case TranscriptFinal():
                if self._late_finals:  # it belongs to a turn already committed
                    self._late_finals -= 1
                elif self._user is not None:
                    self._user.open_segments = max(0, self._user.open_segments - 1)
                    self._transcribed(event.text)
                    self._user.finals += [event.text] if event.text else []
            case TurnEnded():
                self._turn_ended()
            case TurnTranscript():
                self._transcript(event.transcript)
            case AudioOut():
                response = self._response
                if response is not None and self.session.playout.turn is response.playing:
                    response.texts.append(event.text)  # the session queued it for playing
            case Interrupted():
                response = self._response
                if response is not None and response.turn_id == event.turn_id:
                    cancelled = event.reason == "cancel"
                    response.cancel_reason = "client_cancelled" if cancelled else "turn_detected"
                    self._finish(response)
            case StageError():
                self.error(f"{event.stage}_error", event.message, kind="server_error")

    def _transcribed(self, text: str) -> None:
        """A transcription delta for words that extend what the client already has."""
        user = self._user
        if user is None:
            return
        known = " ".join([*user.finals, text]).strip()
        if len(known) > len(user.sent) and known.startswith(user.sent):
            self.send(
                "conversation.item.input_audio_transcription.delta",
                item_id=user.id,
                content_index=0,
                delta=known[len(user.sent) :],
            )
            user.sent = known

    def _committed(self, user: _UserTurn) -> None:
        user.committed = True
        self.send("input_audio_buffer.committed", item_id=user.id, previous_item_id=self._last_item)

    def _turn_ended(self) -> None:
        user, self._user = self._user or _UserTurn(new_id("item")), None
        self._late_finals += user.open_segments
        if not user.committed:
            self._committed(user)
        item = {
            "id": user.id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        for kind in ("conversation.item.added", "conversation.item.done"):
            self.send(kind, previous_item_id=self._last_item, item=item)
        self._last_item = user.id
        self._transcribing.append(user)
        if self.session.relay.turn_id != self._answered:  # the session answers this turn
            self._answered = self.session.relay.turn_id
            self._respond()

    def _transcript(self, transcript: str) -> None:
        if not self._transcribing:
            return
        user = self._transcribing.popleft()
        start, end = user.start_s, user.end_s
        seconds = end - start if start is not None and end is not None else 0.0
        self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=user.id,
            content_index=0,
            transcript=transcript,
            usage={"type": "duration", "seconds": round(seconds, 3)},
        )

    # --- the response --------------------------------------------------------------------------

    def _respond(self) -> None:
        if self._response is not None:
            self._finish(self._response)  # superseded: its playback was stopped
        playing = self.session.playout.turn
        assert playing is not None, "a reply starts its playout when the turn ends"
        response = self._response = _Response(
            new_id("resp"), new_id("item"), self._last_item, self._answered, playing
        )
        self.send("response.created", response=self._response_body(response, "in_progress"))
        item = self._assistant_item(response, "in_progress", None)
        self.send("response.output_item.added", response_id=response.id, output_index=0, item=item)
        self.send("conversation.item.added", previous_item_id=response.previous_item_id, item=item)
        self._last_item = response.item_id
        self.send(
            "response.content_part.added",
            **self._ids(response),
            part={"type": "audio", "transcript": ""},
        )

    def play(self, samples: np.ndarray) -> None:
        response = self._response
        if response is None:
            return
        self._sound_transcript(response)
        if is_reply_audio(self.session, samples):
            delta = base64.b64encode(float32_to_pcm16(samples)).decode()
            self.send("response.output_audio.delta", **self._ids(response), delta=delta)
        self._check_finished()

    def _sound_transcript(self, response: _Response) -> None:
        """Transcript deltas for the chunks whose audio has begun."""
        started = len(response.playing.chunk_started_at)
        while response.texts and response.sent_chunks < started:
            text = response.texts.popleft().strip()
            response.sent_chunks += 1
            if text:
                spaced = text[0].isalnum() and response.transcript[-1:] not in ("", " ")
                delta = f" {text}" if spaced else text
                response.transcript += delta
                self.send(
                    "response.output_audio_transcript.delta", **self._ids(response), delta=delta
                )

    def _check_finished(self) -> None:
        response = self._response
        if response is not None and self.session.playout.turn is not response.playing:
            self._finish(response)

    def _finish(self, response: _Response) -> None:
        self._response = None
        if response.cancel_reason is None and response.playing.finished_at is None:
            response.cancel_reason = "turn_detected"  # stopped for the user's next turn
        status = "completed" if response.cancel_reason is None else "cancelled"
        if status == "cancelled":
            transcript = " ".join(response.playing.heard)
        else:
            self._sound_transcript(response)
            transcript = response.transcript
        ids = self._ids(response)
        self.send("response.output_audio.done", **ids)
        self.send("response.output_audio_transcript.done", **ids, transcript=transcript)
        self.send(
            "response.content_part.done", **ids, part={"type": "audio", "transcript": transcript}
        )
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._assistant_item(response, item_status, transcript)
        self.send("response.output_item.done", response_id=response.id, output_index=0, item=item)
        self.send("conversation.item.done", previous_item_id=response.previous_item_id, item=item)
        details = (
            None
            if response.cancel_reason is None
            else {"type": "cancelled", "reason": response.cancel_reason}
        )
        self.send("response.done", response=self._response_body(response, status, details, item))

    @staticmethod
    def _ids(response: _Response) -> Json:
        return {
            "response_id": response.id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }

    @staticmethod
    def _assistant_item(response: _Response, status: str, transcript: str | None) -> Json:
        content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
        return {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def _response_body(
        self,
        response: _Response,
        status: str,
        details: Json | None = None,
        item: Json | None = None,
    ) -> Json:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": [] if item is None else [item],
            "conversation_id": self._conversation_id,
            "output_modalities": ["audio"],
            "audio": {"output": {"format": FORMAT, "voice": self.settings.tts.voice}},
            "max_output_tokens": self.settings.llm.max_reply_tokens,
            "usage": None,
            "metadata": None,
        }


async def realtime_endpoint(request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/realtime``: one Realtime API conversation per websocket."""
    return await Realtime(request).run()
