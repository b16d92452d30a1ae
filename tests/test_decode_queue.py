"""The shared decode queue: finals first, cancelled decodes skipped, errors handed back; and a
stream's finals applied in order even when they come back out of order."""

import asyncio
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from asr.decode_queue import FINAL, PARTIAL, DecodeQueue
from asr.recognizer import StreamingRecognizer
from asr.stage import AsrStage
from asr.vad import SAMPLE_RATE, VoiceActivityDetector
from asr.whisper import DecodeRequest, Hypothesis
from tests.test_asr_logic import VAD, ScriptedDecoder, ScriptedVad, quiet, settings, tone
from voice.clock import VirtualClock
from voice.events import AudioFrame, TranscriptFinal


def request(tag: float) -> DecodeRequest:
    return DecodeRequest(np.zeros(160, np.float32), offset=tag)


class GatedDecoder:
    """Records the order decodes ran in; the first one waits until ``release`` is set."""

    def __init__(self) -> None:
        self.ran: list[float] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, r: DecodeRequest) -> Hypothesis:
        if not self.ran:
            self.started.set()
            self.release.wait(5)
        self.ran.append(r.offset)
        if r.offset < 0:
            raise RuntimeError("model failed")
        return Hypothesis([])


def test_finals_run_before_partials_that_were_queued_earlier():
    decoder = GatedDecoder()
    queue = DecodeQueue(decoder, workers=1)
    busy = queue.submit(request(0), PARTIAL)
    assert decoder.started.wait(5)  # the only worker is busy
    jobs = [
        queue.submit(request(1), PARTIAL),
        queue.submit(request(2), PARTIAL),
        queue.submit(request(3), FINAL),
    ]
    decoder.release.set()
    for job in [busy, *jobs]:
        job.result(5)
    queue.close()
    assert decoder.ran == [0, 3, 1, 2]


def test_a_decode_cancelled_while_it_waits_never_runs_and_errors_are_handed_back():
    decoder = GatedDecoder()
    queue = DecodeQueue(decoder, workers=1)
    queue.submit(request(0), PARTIAL)
    assert decoder.started.wait(5)
    dropped = queue.submit(request(1), FINAL)
    failing = queue.submit(request(-1), FINAL)
    assert dropped.cancel()
    decoder.release.set()
    with pytest.raises(RuntimeError, match="model failed"):
        failing.result(5)
    queue.close()
    assert decoder.ran == [0, -1]


class HeldFinals:
    """Decodes at once, but hands back finals only when told to."""

    def __init__(self) -> None:
        self.decoder = ScriptedDecoder()
        self.held: list[tuple[Future[Hypothesis], Hypothesis]] = []

    def submit(self, r: DecodeRequest, priority: int) -> Future[Hypothesis]:
        future: Future[Hypothesis] = Future()
        future.set_running_or_notify_cancel()
        if priority == FINAL:
            self.held.append((future, self.decoder(r)))
        else:
            future.set_result(self.decoder(r))
        return future


def test_a_streams_finals_are_applied_in_order_when_they_come_back_out_of_order():
    async def main() -> list[TranscriptFinal]:
        clock, events, queue = VirtualClock(), [], HeldFinals()
        stage = AsrStage(
            VoiceActivityDetector(ScriptedVad(), VAD, SAMPLE_RATE),
            StreamingRecognizer(settings()),
            queue,
            clock,
            events.append,
            VAD,
        )
        audio = np.concatenate([tone(0.9), quiet(2.0), tone(0.6), quiet(0.6)])  # two segments
        for i in range(0, len(audio), 320):
            await stage.push(
                AudioFrame(t=clock.now(), samples=audio[i : i + 320], sample_rate=SAMPLE_RATE)
            )
            await clock.advance(0.02)
        assert len(queue.held) == 2  # both segments' finals are out, neither is back
        for future, result in reversed(queue.held):  # the second comes back first
            future.set_result(result)
            await asyncio.sleep(0.01)
        await stage.close()
        return [e for e in events if isinstance(e, TranscriptFinal)]

    first, second = asyncio.run(main())
    assert first.words[0].start < 0.9 < second.words[0].start
