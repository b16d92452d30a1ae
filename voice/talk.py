"""`relayvoice talk IN.wav`: a recorded user through the live session, in real time.

The recording is pushed frame by frame as a microphone would deliver it; the session's output
is read frame by frame as a sound card would play it, on the same clock, so the reply WAV lines
up with the input and every latency in the table is what a listener would have experienced.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

from voice.audio import check_rate, read_wav, resample, write_wav
from voice.clock import Clock, RealClock
from voice.engine import Engine
from voice.events import AudioFrame, Event, StageError
from voice.replay import FRAME_S, stream
from voice.session import Session, TurnRecord
from voice.settings import RelayMode

IDLE_CAP_S = 60.0  # a reply that has not finished this long after the input ends is cut


async def feed_silence(session: Session, clock: Clock, rate: int, seconds: float) -> None:
    """Keep the microphone open (silent frames, paced) for ``seconds``."""
    step = int(FRAME_S * rate)
    deadline = clock.now()
    for _ in range(round(seconds / FRAME_S)):
        deadline += FRAME_S
        await clock.sleep_until(deadline)
        await session.push(
            AudioFrame(t=clock.now(), samples=np.zeros(step, np.float32), sample_rate=rate)
        )


async def converse(
    session: Session, clock: Clock, audio: np.ndarray, rate: int, settle_s: float
) -> np.ndarray:
    """Play ``audio`` into ``session`` in real time, then stay silent for ``settle_s`` (the
    longest a turn can take to end) and until every reply has been heard; return what the
    session played, from the input's first sample on."""
    played: list[np.ndarray] = []
    player = asyncio.create_task(session.playout.run(played.append))
    try:
        await stream(clock, clock.now(), audio, rate, session.push)
        await feed_silence(session, clock, rate, settle_s)
        waited = settle_s
        while session.busy and waited < IDLE_CAP_S:
            await feed_silence(session, clock, rate, 0.5)
            waited += 0.5
    finally:
        player.cancel()
        await asyncio.gather(player, return_exceptions=True)
    return np.concatenate(played) if played else np.zeros(0, np.float32)


def load_input(path: Path) -> tuple[np.ndarray, int]:
    """A WAV at a rate the pipeline takes (8, 16, 24 or 48 kHz; others resampled to 16 kHz)."""
    audio, rate = read_wav(path)
    try:
        check_rate(rate)
    except ValueError:
        audio, rate = resample(audio, rate, 16000), 16000
    return audio, rate


def table(records: list[TurnRecord]) -> str:
    """One line per reply; times in ms from the VAD's end of the user's speech."""

    def ms(t: float | None, since: float | None) -> str:
        return "-" if t is None or since is None else f"{(t - since) * 1000:.0f}"

    rows = [
        "turn | user | ended | first audio | continuation | gap | verdict | prefix | reply",
        "---|---|---|---|---|---|---|---|---",
    ]
    for r in records:
        end = r.speech_ended_at
        rows.append(
            f"{r.turn_id} | {r.user_text} | {ms(r.turn_ended_at, end)} | "
            f"{ms(r.first_audio_out_at, end)} | {ms(r.continuation_audio_out_at, end)} | "
            f"{r.gap_ms:.0f} | {r.verdict} | {r.prefix_text} | {r.reply_text}"
            + (f" [{r.interruption}: heard {r.heard_text!r}]" if r.interruption else "")
        )
    return "\n".join(rows)


def _report_errors(event: Event) -> None:
    if isinstance(event, StageError):
        print(f"relayvoice: {event.stage}: {event.message}", file=sys.stderr)


async def talk(
    engine: Engine, wav: Path, out: Path | None, mode: RelayMode | None
) -> list[TurnRecord]:
    """Run the recording through a fresh session; write what the user hears, print the table."""
    audio, rate = load_input(wav)
    await engine.warm()
    clock = RealClock()
    session = engine.session(clock, input_rate=rate, mode=mode, observer=_report_errors)
    try:
        settle_s = engine.settings.turn.max_silence_ms / 1000 + 0.5
        played = await converse(session, clock, audio, rate, settle_s)
    finally:
        await session.close()
    if out is not None:
        write_wav(out, played, session.playout.sample_rate)
    print(table(session.records))
    return session.records
