"""``/v1/pcm``: the plainest way in, for telephony bridges and scripts: raw audio both ways.

``GET /v1/pcm?rate=16000[&mode=relay]`` upgrades to a websocket. Binary messages in are PCM16
mono little-endian at ``rate`` (8000, 16000, 24000 or 48000 Hz); binary messages out are the
reply's audio at the same rate, 20 ms each, paced in real time as it is read from the
session's playout (what is read counts as heard when the user interrupts). Nothing is sent
between replies. Text messages out are JSON events, one ``type`` each: ``ready``,
``speech_started``/``speech_stopped``, ``transcript_partial``/``transcript_final`` (per speech
segment), ``turn_ended``, ``turn_transcript`` (the whole turn), ``reply_text``/``reply_done``
(the reply as it is written), ``interrupted``, ``turn_record`` (a finished reply's timeline,
in ms after the end of the user's speech, and that end, ``speech_ended_at``, in seconds of the
server's monotonic clock) and ``error``. Text in: ``{"type": "mode", "mode":
"relay|cascaded|fast"}`` switches the mode from the next reply on.
"""

from __future__ import annotations

import dataclasses
import json
from typing import cast

import numpy as np
from aiohttp import WSMessage, WSMsgType, web

from voice.audio import AudioFormatError, float32_to_pcm16, pcm16_to_float32
from voice.events import (
    AudioFrame,
    Event,
    Interrupted,
    ResponseDone,
    ResponseTextDelta,
    SpeechEnded,
    SpeechStarted,
    StageError,
    TranscriptFinal,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
)
from voice.session import TurnRecord
from voice.settings import RelayMode
from web import messages
from web.messages import MODES, Json
from web.websocket import Conversation, is_reply_audio

RATES = (8000, 16000, 24000, 48000)
DEFAULT_RATE = 16000
FRAME_S = 0.02


def event_message(event: Event) -> Json | None:
    """The client's view of a session event (None: not one it is told about)."""
    match event:
        case SpeechStarted() | SpeechEnded():
            return messages.speech(event, audio_time=event.audio_time)
        case TranscriptPartial():
            return messages.transcript_partial(event)
        case TranscriptFinal():
            return messages.transcript_final(event.text)
        case TurnEnded():
            return messages.turn_ended(event, reason=event.reason)
        case TurnTranscript():
            return {"type": "turn_transcript", "transcript": event.transcript}
        case ResponseTextDelta():
            return messages.reply_text(event.turn_id, event.text, source=event.source)
        case ResponseDone():
            return {
                "type": "reply_done",
                "turn_id": event.turn_id,
                "text": event.text,
                "cancelled": event.cancelled,
            }
        case Interrupted():
            return messages.interrupted(event)
        case StageError():
            return messages.error(f"{event.stage}_error", event.message)
    return None


def record_message(record: TurnRecord) -> Json:
    """A finished reply's record, its clock times (``*_at``) turned into ``*_ms``: ms after the
    user's speech ended (None: it did not happen)."""
    message: Json = {"type": "turn_record"}
    for name, value in dataclasses.asdict(record).items():
        if not name.endswith("_at"):
            message[name] = value
    message.update(record.timeline_ms())
    message["speech_ended_at"] = record.speech_ended_at  # for a client on the same machine
    return message


class Pcm(Conversation):
    frame_s = FRAME_S
    transport = "pcm"

    def __init__(self, request: web.Request) -> None:
        self._rate_text = request.query.get("rate", str(DEFAULT_RATE))
        try:
            rate = int(self._rate_text)
        except ValueError:
            rate = 0  # refused below, with the text as given
        super().__init__(request, rate, rate)
        self._mode_text = request.query.get("mode")
        if self._mode_text in MODES:
            self.mode = cast(RelayMode, self._mode_text)
        self._records_sent = 0

    def refusal(self) -> tuple[str, str] | None:
        if self.input_rate not in RATES:
            return (
                "unsupported_rate",
                f"rate must be one of {', '.join(map(str, RATES))} (Hz); got {self._rate_text!r}",
            )
        if self._mode_text is not None and self.mode is None:
            return "invalid_mode", f"mode must be one of {', '.join(MODES)}"
        return None

    def send(self, message: Json) -> None:
        self.link.send(json.dumps(message))

    def error(self, code: str, message: str) -> None:
        self.send(messages.error(code, message))

    def started(self) -> None:
        self.send(
            {
                "type": "ready",
                "session_id": self.session.id,
                "sample_rate": self.input_rate,
                "mode": self.session.mode,
            }
        )

    def observe(self, event: Event) -> None:
        if (message := event_message(event)) is not None:
            self.send(message)

    def play(self, samples: np.ndarray) -> None:
        if is_reply_audio(self.session, samples):
            self.link.send(float32_to_pcm16(samples))
        self._send_records()

    def _send_records(self) -> None:
        """A reply's record appears when its audio ends or is stopped; looked for each read."""
        for record in self.session.records[self._records_sent :]:
            self.send(record_message(record))
        self._records_sent = len(self.session.records)

    async def handle(self, message: WSMessage) -> None:
        if message.type is WSMsgType.BINARY:
            await self._audio(message.data)
            return
        try:
            request = messages.parse(message.data)
        except messages.BadJson as exc:
            self.error("invalid_json", str(exc))
            return
        mode = request.get("mode") if isinstance(request, dict) else None
        if not isinstance(request, dict) or request.get("type") != "mode" or mode not in MODES:
            self.error(
                "invalid_message",
                f'expected {{"type": "mode", "mode": one of {", ".join(MODES)}}}; '
                "audio goes in binary messages",
            )
            return
        self.session.set_mode(mode)
        self.send(messages.mode(mode))

    async def _audio(self, data: bytes) -> None:
        if not data or len(data) % 2:
            self.error(
                "invalid_audio",
                f"audio must be PCM16: a positive, even number of bytes; got {len(data)}",
            )
            return
        frame = AudioFrame(
            t=self.hub.clock.now(), samples=pcm16_to_float32(data), sample_rate=self.input_rate
        )
        try:
            await self.session.push(frame)
        except AudioFormatError as exc:
            self.error("invalid_audio", str(exc))


async def pcm_endpoint(request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/pcm``: one conversation of raw PCM per websocket."""
    return await Pcm(request).run()
