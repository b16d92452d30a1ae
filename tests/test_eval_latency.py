"""The latency benchmark's arithmetic over a transport: which frame holds the true end of
speech, when the client first hears the reply, what the transport adds to the onset, and the
server's records brought back onto the clock the client shares with it."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from eval.latency import ClientTimes, Dialogue, Microphone, TurnResult, UserTurn
from eval.transport import (
    SOUND_PEAK,
    Client,
    first_heard,
    peak,
    record_from_message,
    run_dialogue,
)
from voice.clock import VirtualClock
from voice.events import AudioFrame
from voice.session import TurnRecord
from web.pcm import record_message
from web.webrtc import latency_message


def frame(value: int, size: int = 320) -> np.ndarray:
    pcm = np.zeros(size, np.int16)
    pcm[size // 2] = value
    return pcm


async def test_the_true_end_is_sent_with_the_frame_that_holds_it():
    clock = VirtualClock(100.0)
    pushed: list[AudioFrame] = []

    async def push(f: AudioFrame) -> None:
        pushed.append(f)

    mic = Microphone(push, clock)
    task = asyncio.create_task(mic.run())
    started = mic.say(np.full(800, 0.1, np.float32))  # 50 ms: two full frames and a part
    await clock.advance(0.1)
    assert await started == pytest.approx(100.0)
    assert not mic.speaking
    assert mic.sent_at(0.040) == pytest.approx(100.04)  # its last sample is in the 2nd frame
    assert mic.sent_at(0.0401) == pytest.approx(100.06)
    assert mic.sent_at(0.050) == pytest.approx(100.06)
    assert [f.t for f in pushed[:3]] == pytest.approx([100.02, 100.04, 100.06])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_onset_at_the_client_is_the_first_sound_received_once_the_reply_has_begun():
    assert peak(frame(-32768)) == 1.0 and peak(np.zeros(0, np.int16)) == 0.0
    assert peak(frame(0)) < SOUND_PEAK <= peak(frame(-1))
    heard = [
        (10.00, peak(frame(9000))),  # the end of an earlier reply
        (10.52, peak(frame(0))),  # silence (WebRTC sends it between replies)
        (10.54, peak(frame(0))),
        (10.56, peak(frame(3))),  # the reply's first frame: the voice's near silent lead-in
        (10.58, peak(frame(12000))),
    ]
    assert first_heard(heard, since=10.0) == 10.00
    assert first_heard(heard, since=10.5) == 10.56
    assert first_heard(heard, since=10.5, threshold=0.1) == 10.58
    assert first_heard(heard, since=10.6) is None
    assert first_heard([], since=0.0) is None

    turn = UserTurn("t", "plain", np.zeros(16000, np.float32), speech=(0.1, 0.9))
    reply = TurnRecord(turn_id=1, mode="relay", turn_ended_at=10.3, first_audio_out_at=10.55)
    result = TurnResult("d", "relay", turn, started_at=9.0, reply=reply)
    assert result.true_end == pytest.approx(9.9)  # in process: the last voiced sample
    assert result.onset_ms == pytest.approx(650) and result.transport_overhead_ms is None

    result.client = ClientTimes(end_sent_at=9.91, heard_at=first_heard(heard, 10.55))
    assert result.true_end == 9.91  # over a transport: when its frame was sent
    assert result.session_onset_ms == pytest.approx(640)
    assert result.onset_ms == pytest.approx(650)
    assert result.transport_overhead_ms == pytest.approx(10)
    assert result.row()["transport_overhead_ms"] == 10.0


@pytest.mark.parametrize("message", [record_message, latency_message])
def test_the_servers_record_comes_back_on_the_shared_clock(message):
    record = TurnRecord(
        turn_id=3,
        mode="relay",
        speech_ended_at=1000.25,
        turn_ended_at=1000.5,
        first_text_at=1000.5,
        first_audio_out_at=1000.6125,
        verdict="accepted",
        gap_ms=12.0,
        heard_text="Sure.",
    )
    back = record_from_message(json.loads(json.dumps(message(record))))
    assert back is not None
    assert (back.turn_id, back.verdict, back.gap_ms, back.heard_text) == (
        3,
        "accepted",
        12,
        "Sure.",
    )
    assert back.speech_ended_at == 1000.25
    assert back.turn_ended_at == pytest.approx(1000.5)
    assert back.first_audio_out_at == pytest.approx(1000.6125, abs=1e-4)  # ms to 0.1
    assert back.finished_at is None
    unknown_end = dataclasses.replace(record, speech_ended_at=None)
    assert record_from_message(message(unknown_end)) is None


class ClosingClient(Client):
    """The server closes the connection after a few frames of the user's speech."""

    rate = 16000

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.frames = 0

    async def push(self, frame: AudioFrame) -> None:
        self.frames += 1
        if self.frames > 5:
            raise ConnectionResetError("Cannot write to closing transport")


async def test_a_connection_closed_mid_turn_is_reported_as_such():
    clock = VirtualClock()
    client = ClosingClient(clock)
    turn = UserTurn("t", "plain", np.full(16000, 0.1, np.float32), (0.0, 1.0))
    replay = asyncio.create_task(run_dialogue(client, Dialogue("d", [turn]), "relay", 1.0))
    while not replay.done():
        await clock.advance(0.5)
    with pytest.raises(ConnectionResetError, match="closing transport"):
        await replay
