"""The JSON events of ``/v1/pcm`` and of the WebRTC page's "events" channel: one vocabulary.

Both transports tell their client about the session under the same ``type`` names, and build
each message here so that a name always carries the same fields. Each transport picks the
events it reports and adds the fields only it sends (``**extra``: ``/v1/pcm`` stream times
and the reason a turn ended, the page the text of a partial transcript to show, a stage's
name in its errors). Timelines are in ms after the end of the user's speech. The OpenAI
Realtime protocol (``web.realtime``) has its own events; it shares only ``Json``.
"""

from __future__ import annotations

import json
from typing import Any, get_args

from voice.events import Interrupted, SpeechEnded, SpeechStarted, TranscriptPartial, TurnEnded
from voice.settings import RelayMode

Json = dict[str, Any]
MODES: tuple[str, ...] = get_args(RelayMode)
ECHO_CHARS = 60  # how much of a client's bad value an error message repeats


class BadJson(ValueError):
    """A client message that is not usable JSON, whatever the parser's complaint."""


def parse(data: str | bytes) -> object:
    """``json.loads`` with every way it can fail as one error: bad syntax or encoding, an
    integer past Python's digit limit, nesting deeper than the recursion limit."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadJson(f"the message is not usable JSON: {brief(str(exc))}") from None


def brief(value: object) -> str:
    """A client's value as an error message may repeat it: short, so an error about a huge
    value is not itself huge."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}… ({len(text)} characters)"


def speech(event: SpeechStarted | SpeechEnded, **extra: Any) -> Json:
    kind = "speech_started" if isinstance(event, SpeechStarted) else "speech_stopped"
    return {"type": kind, **extra}


def transcript_partial(event: TranscriptPartial, **extra: Any) -> Json:
    return {
        "type": "transcript_partial",
        **extra,
        "committed": event.committed,
        "tentative": event.tentative,
    }


def transcript_final(text: str) -> Json:
    return {"type": "transcript_final", "text": text}


def turn_ended(event: TurnEnded, **extra: Any) -> Json:
    return {"type": "turn_ended", "transcript": event.transcript, **extra}


def reply_text(turn_id: int, text: str, **extra: Any) -> Json:
    return {"type": "reply_text", "turn_id": turn_id, "text": text, **extra}


def interrupted(event: Interrupted) -> Json:
    return {
        "type": "interrupted",
        "turn_id": event.turn_id,
        "reason": event.reason,
        "heard_text": event.heard_text,
    }


def error(code: str, message: str, **extra: Any) -> Json:
    return {"type": "error", "code": code, **extra, "message": message}


def mode(name: str) -> Json:
    return {"type": "mode", "mode": name}
