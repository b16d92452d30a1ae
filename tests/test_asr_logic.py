"""ASR policy on scripted hypotheses and a scripted VAD model: no Whisper, no real time."""

import asyncio
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from asr.agreement import LocalAgreement, common_prefix, drop_repeats, normalize_word, trim_echo
from asr.decode_queue import FINAL, PARTIAL, DecodeQueue
from asr.recognizer import StreamingRecognizer
from asr.stage import AsrStage
from asr.vad import WINDOW, VoiceActivityDetector
from asr.whisper import SAMPLE_RATE, DecodeRequest, Hypothesis
from voice.audio import AudioFormatError
from voice.clock import VirtualClock
from voice.events import (
    AudioFrame,
    SpeechEnded,
    SpeechStarted,
    TranscriptFinal,
    TranscriptPartial,
    Word,
)
from voice.settings import AsrSettings, VadSettings


def words(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [
        Word(text=f" {t}", start=start + i * step, end=start + (i + 1) * step)
        for i, t in enumerate(text.split())
    ]


def texts(ws) -> list[str]:
    return [w.text.strip() for w in ws]


def test_normalisation_ignores_case_and_punctuation():
    assert normalize_word(" Hello,") == normalize_word("hello") == "hello"
    assert common_prefix(words("the cat sat"), words("The cat, stood")) == 2


def test_local_agreement_commits_what_two_hypotheses_share_but_never_the_last_word():
    agreement = LocalAgreement()
    assert agreement.update(words("he was")) == []
    assert texts(agreement.update(words("he was not an"))) == ["he", "was"]
    assert texts(agreement.tentative) == ["not", "an"]
    assert texts(agreement.update(words("not an"))) == ["not"]  # "an" is the newest's last word
    assert texts(agreement.update(words("an ill"))) == ["an"]
    agreement.finish(words("ill disposed"))
    assert texts(agreement.committed) == ["he", "was", "not", "an", "ill", "disposed"]


def test_local_agreement_force_takes_leading_tentative_words():
    agreement = LocalAgreement()
    agreement.update(words("a b c"))
    agreement.force(agreement.tentative[:2])
    assert texts(agreement.committed) == ["a", "b"] and texts(agreement.tentative) == ["c"]


@pytest.mark.parametrize(
    ("said", "kept"),
    [
        ("that that that that that", "that"),
        ("mister john mister john mister john mister john", "mister john"),
        ("he had had enough", "he had had enough"),  # two in a row is speech
        ("go go go", "go"),
        ("", ""),
    ],
)
def test_drop_repeats_cuts_decoder_loops(said, kept):
    assert " ".join(texts(drop_repeats(words(said)))) == kept


def test_trim_echo_drops_seam_repeats_and_restarts():
    prefix = words("that agent is already logged")
    assert texts(trim_echo(prefix, words("logged on"))) == ["on"]
    assert texts(
        trim_echo(words("please enter your agent number"), words("followed by please enter your"))
    ) == [
        "followed",
        "by",
    ]
    assert texts(trim_echo(prefix, words("on the line"))) == ["on", "the", "line"]


def settings(**changes) -> AsrSettings:
    base = AsrSettings(partial_interval_ms=250, max_window_s=2.0, pre_roll_ms=200, rejoin_ms=1000)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def feed(recognizer: StreamingRecognizer, seconds: float) -> None:
    for _ in range(int(seconds * SAMPLE_RATE / WINDOW)):
        recognizer.add(np.zeros(WINDOW, dtype=np.float32))


def test_partials_come_every_interval_and_know_their_committed_prefix():
    r = StreamingRecognizer(settings())
    feed(r, 1.0)
    r.start_segment(0.8)
    assert r.partial_request() is not None  # pre-roll and speech since the start
    assert r.partial_request() is None  # no new audio yet
    feed(r, 0.3)
    request = r.partial_request()
    assert request is not None and request.offset == pytest.approx(0.6)
    r.apply_partial(r.segment, Hypothesis(words("one two three", start=0.8)))
    r.apply_partial(r.segment, Hypothesis(words("one two three four", start=0.8)))
    feed(r, 0.3)
    request = r.partial_request()
    assert texts(request.prefix) == ["one", "two", "three"]
    assert request.context == ""


def test_window_stays_bounded_on_long_speech():
    r = StreamingRecognizer(settings())
    r.start_segment(0.0)
    spoken = " ".join(f"w{i}" for i in range(200))
    longest = 0.0
    for step in range(80):  # 80 x 0.25 s = 20 s of continuous speech
        feed(r, 0.25)
        request = r.partial_request()
        if request is None:
            continue
        longest = max(longest, request.end - request.offset)
        known = len(request.prefix) + len(request.context.split())
        r.apply_partial(r.segment, Hypothesis(words(spoken, step=0.25)[known : step + 1]))
    assert longest <= 2.0 + 0.25 + 0.1 + 0.25  # max window + one interval + margins


def test_close_detaches_and_stale_partials_are_ignored():
    r = StreamingRecognizer(settings())
    r.start_segment(0.0)
    feed(r, 0.5)
    segment = r.segment
    pending = r.close(0.5)
    assert not r.active
    assert r.apply_partial(segment, Hypothesis(words("late"))) is None
    assert texts(r.complete(pending, Hypothesis(words("hello there")))) == ["hello", "there"]


def test_a_short_segment_is_decoded_whole_for_its_final_and_may_correct_early_words():
    r = StreamingRecognizer(settings())
    r.start_segment(0.0)
    feed(r, 0.5)
    r.apply_partial(r.segment, Hypothesis(words("how do i")))
    feed(r, 0.25)
    r.apply_partial(r.segment, Hypothesis(words("how do i am")))  # "how do i" committed
    request = r.final_request(0.75)
    assert request.prefix == ()  # nothing forced: the final hears it all again
    words_out = r.complete(r.close(0.75, request), Hypothesis(words("oh i'm from chicago")))
    assert texts(words_out) == ["oh", "i'm", "from", "chicago"]
    # A whole decode that fails or is rejected as noise loses nothing already committed.
    kept = StreamingRecognizer(settings())
    kept.start_segment(0.0)
    feed(kept, 0.5)
    kept.apply_partial(kept.segment, Hypothesis(words("how do i")))
    feed(kept, 0.25)
    kept.apply_partial(kept.segment, Hypothesis(words("how do i am")))
    rejected = Hypothesis([], no_speech_prob=0.9, rejected="no speech")
    assert texts(kept.complete(kept.close(0.75), rejected)) == ["how", "do", "i"]
    # Longer than final_redecode_s: only the words not yet committed are decoded.
    tail_only = StreamingRecognizer(settings(final_redecode_s=0.5))
    tail_only.start_segment(0.0)
    feed(tail_only, 0.5)
    tail_only.apply_partial(tail_only.segment, Hypothesis(words("how do i")))
    feed(tail_only, 0.25)
    tail_only.apply_partial(tail_only.segment, Hypothesis(words("how do i am")))
    request = tail_only.final_request(0.75)
    assert texts(request.prefix) == ["how", "do", "i"]
    pending = tail_only.close(0.75, request)
    final = tail_only.complete(pending, Hypothesis(words("am", start=0.9)))
    assert texts(final) == ["how", "do", "i", "am"]


def test_speech_after_a_short_pause_is_decoded_with_the_audio_before_it():
    r = StreamingRecognizer(settings())
    r.start_segment(0.0)
    feed(r, 1.0)
    r.complete(r.close(1.0), Hypothesis(words("i went to", start=0.1)))
    feed(r, 0.5)
    r.start_segment(1.5)  # within rejoin_ms: same window, earlier words forced as prefix
    feed(r, 0.3)
    request = r.partial_request()
    assert request.offset == 0.0 and texts(request.prefix) == ["i", "went", "to"]
    r.complete(r.close(1.8), Hypothesis(words("the shop", start=1.5)))
    feed(r, 3.0)
    r.start_segment(4.8)  # long pause: a fresh window, earlier words only as the prompt
    feed(r, 0.3)
    request = r.partial_request()
    assert request.offset == pytest.approx(4.6) and request.prefix == ()
    assert request.context == "i went to the shop"


def test_speech_resuming_while_the_last_final_is_out_never_decodes_its_audio_twice():
    r = StreamingRecognizer(settings())
    r.start_segment(0.0)
    feed(r, 1.0)
    pending = r.close(1.0)  # its final decode is still running
    feed(r, 0.2)
    r.start_segment(1.2)
    feed(r, 0.3)
    assert r.partial_request() is None  # its words are this segment's prefix: wait for them
    early = r.final_request(1.5)  # a segment over before the earlier final is back
    assert early.offset == pytest.approx(1.1) and early.prefix == ()
    r.complete(pending, Hypothesis(words("please", start=0.5)))
    request = r.partial_request()
    assert request.offset == 0.0 and texts(request.prefix) == ["please"]


class ScriptedVad:
    """Stands in for Silero: P(speech) is 0.9 for loud windows, 0.01 for quiet ones."""

    def reset(self) -> None:
        pass

    def probability(self, window: np.ndarray) -> float:
        return 0.9 if np.abs(window).mean() > 0.05 else 0.01


class LingeringVad(ScriptedVad):
    """Like Silero: still hears speech for three windows (96 ms) after the audio goes quiet."""

    def __init__(self) -> None:
        self._since_loud = 99

    def probability(self, window: np.ndarray) -> float:
        self._since_loud = 0 if super().probability(window) > 0.5 else self._since_loud + 1
        return 0.9 if self._since_loud <= 3 else 0.01


def tone(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


VAD = VadSettings(start_ms=64, hangover_ms=96, webrtc_mode=-1)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_vad_finds_start_and_end_at_any_input_rate(rate):
    vad = VoiceActivityDetector(ScriptedVad(), VAD, rate)
    windows = vad.process(
        np.concatenate([quiet(0.512, rate), tone(1.024, rate), quiet(0.512, rate)])
    )
    windows += vad.process(quiet(0.1, rate))
    started = [w for w in windows if w.started]
    ended = [w for w in windows if w.ended]
    assert len(started) == len(ended) == 1
    assert started[0].speech_time == pytest.approx(0.512, abs=0.04)
    assert ended[0].speech_time == pytest.approx(1.536, abs=0.04)
    assert ended[0].start - ended[0].speech_time == pytest.approx(0.064, abs=0.001)  # hangover
    assert sum(w.paused for w in windows) == 1


def test_vad_ignores_a_click_shorter_than_start_ms():
    vad = VoiceActivityDetector(ScriptedVad(), VAD, SAMPLE_RATE)
    windows = vad.process(np.concatenate([quiet(0.256), tone(0.032), quiet(0.5)]))
    assert not any(w.started for w in windows)


def test_vad_pause_shorter_than_hangover_does_not_end_speech():
    vad = VoiceActivityDetector(ScriptedVad(), VAD, SAMPLE_RATE)
    windows = vad.process(np.concatenate([tone(0.5), quiet(0.064), tone(0.5), quiet(0.3)]))
    assert sum(w.started for w in windows) == 1 and sum(w.ended for w in windows) == 1
    assert sum(w.paused for w in windows) == 2


def test_vad_marks_the_window_where_the_audio_went_quiet_before_silero_lets_go():
    vad = VoiceActivityDetector(LingeringVad(), VAD, SAMPLE_RATE)
    windows = vad.process(np.concatenate([quiet(0.256), tone(1.024), quiet(0.5)]))
    first_quiet = next(w for w in windows if w.quiet)
    ended = next(w for w in windows if w.ended)
    assert first_quiet.start == pytest.approx(1.28) and first_quiet.probability == 0.9
    assert ended.start - first_quiet.start == pytest.approx(0.032 * 5)  # 3 lingering + hangover
    assert not any(w.quiet for w in windows if w.start < 1.28)


def test_vad_quiet_marks_can_be_turned_off():
    settings = VadSettings(start_ms=64, hangover_ms=96, webrtc_mode=-1, quiet_ratio=0)
    vad = VoiceActivityDetector(LingeringVad(), settings, SAMPLE_RATE)
    assert not any(w.quiet for w in vad.process(np.concatenate([tone(1.024), quiet(0.5)])))


class ScriptedDecoder:
    """Returns one word per 0.3 s of audio after the prefix, and records each request."""

    def __init__(self) -> None:
        self.requests: list[DecodeRequest] = []

    def __call__(self, request: DecodeRequest) -> Hypothesis:
        self.requests.append(request)
        start = request.prefix[-1].end if request.prefix else request.offset
        count = int((request.end - start) / 0.3)
        return Hypothesis(
            words(" ".join(f"w{i}" for i in range(count)), start=start), compute_ms=1.0
        )


class WholeFailsDecoder(ScriptedDecoder):
    """A decode of a long window with nothing forced (a whole-segment final) comes back
    empty, as Whisper's output does when it is rejected as a loop."""

    def __call__(self, request: DecodeRequest) -> Hypothesis:
        hypothesis = super().__call__(request)
        long = request.end - request.offset >= 1.2
        return (
            Hypothesis([], rejected="repetition loop")
            if long and not request.prefix
            else hypothesis
        )


async def run_stage(chunks: list[np.ndarray], rate: int = SAMPLE_RATE, model=None, decoder=None):
    clock = VirtualClock()
    events = []
    decoder = decoder or ScriptedDecoder()
    vad = VoiceActivityDetector(model or ScriptedVad(), VAD, rate)
    decodes = DecodeQueue(decoder, workers=2)
    stage = AsrStage(vad, StreamingRecognizer(settings()), decodes, clock, events.append, VAD)
    frame = int(0.02 * rate)
    for chunk in chunks:
        for i in range(0, len(chunk), frame):
            await stage.push(
                AudioFrame(t=clock.now(), samples=chunk[i : i + frame], sample_rate=rate)
            )
            await clock.advance(0.02)
            for _ in range(3):  # let the worker thread's results come back
                await asyncio.sleep(0.001)
    await stage.close()
    decodes.close()
    return events, decoder, stage


def test_stage_emits_start_partials_end_final_in_order():
    events, decoder, stage = asyncio.run(run_stage([quiet(0.3), tone(1.5), quiet(0.6)]))
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechStarted and kinds[-1] is TranscriptFinal
    assert kinds.index(SpeechEnded) < kinds.index(TranscriptFinal)
    partials = [e for e in events if isinstance(e, TranscriptPartial)]
    assert len(partials) >= 3
    assert all(kinds.index(TranscriptPartial) < kinds.index(SpeechEnded) for _ in partials)
    final = events[-1]
    assert final.text.startswith("w0") and final.t >= events[kinds.index(SpeechEnded)].t
    assert stage.decode_ms == len(decoder.requests)


def test_stage_reuses_the_speculative_final_started_in_the_pause():
    events, decoder, _ = asyncio.run(run_stage([tone(1.0), quiet(0.5)]))
    ended = next(e for e in events if isinstance(e, SpeechEnded))
    finals = [
        r for r in decoder.requests if r.end <= ended.audio_time + 0.2 and r.end >= ended.audio_time
    ]
    assert len(finals) == 1  # the pause's decode served as the final: no second final decode


def test_stage_starts_the_final_where_the_audio_went_quiet_not_where_silero_let_go():
    events, decoder, _ = asyncio.run(run_stage([tone(1.0), quiet(0.5)], model=LingeringVad()))
    ended = next(e for e in events if isinstance(e, SpeechEnded))
    final = next(e for e in events if isinstance(e, TranscriptFinal))
    finals = [r for r in decoder.requests if r.end > 0.95]
    assert len(finals) == 1  # one final decode, on the audio up to the quiet window
    assert finals[0].end < ended.audio_time  # started before Silero's end was heard
    assert final.text == "w0 w1 w2"


class LongLingeringVad(LingeringVad):
    """Hears speech for 320 ms after the audio goes quiet, as it would soft speech."""

    def probability(self, window: np.ndarray) -> float:
        super().probability(window)
        return 0.9 if self._since_loud <= 10 else 0.01


def test_stage_decodes_again_when_silero_hears_long_after_the_audio_went_quiet():
    events, decoder, _ = asyncio.run(run_stage([tone(1.0), quiet(0.8)], model=LongLingeringVad()))
    ended = next(e for e in events if isinstance(e, SpeechEnded))
    assert ended.audio_time > 1.3
    assert decoder.requests[-1].end > ended.audio_time  # the final heard the soft audio too


def test_stage_drops_the_quiet_guess_when_loud_speech_follows():
    chunks = [tone(1.0), quiet(0.064), tone(0.9), quiet(0.5)]
    events, decoder, _ = asyncio.run(run_stage(chunks, model=LingeringVad()))
    assert sum(isinstance(e, SpeechEnded) for e in events) == 1
    final = next(e for e in events if isinstance(e, TranscriptFinal))
    assert decoder.requests[-1].end > 1.96  # the final decode heard the speech after the dip
    assert len(final.words) >= 6  # a guess from the dip (audio up to ~1.0 s) would give 3


def test_a_whole_final_that_comes_back_empty_still_decodes_the_words_after_the_committed():
    events, decoder, _ = asyncio.run(
        run_stage([tone(1.5), quiet(0.5)], decoder=WholeFailsDecoder())
    )
    final = next(e for e in events if isinstance(e, TranscriptFinal))
    whole, tail = decoder.requests[-2:]
    assert not whole.prefix and tail.prefix and tail.end == whole.end
    assert final.words[-1].end > 1.45  # up to the end of speech, not only the committed words


def test_stage_rejects_bad_frames_clearly():
    async def main():
        stage = AsrStage(
            VoiceActivityDetector(ScriptedVad(), VAD, 16000),
            StreamingRecognizer(settings()),
            DecodeQueue(ScriptedDecoder(), workers=1),
            VirtualClock(),
            lambda e: None,
            VAD,
        )
        with pytest.raises(AudioFormatError, match="empty audio frame"):
            await stage.push(AudioFrame(t=0, samples=np.zeros(0, np.float32), sample_rate=16000))
        with pytest.raises(AudioFormatError, match="stream is at 16000 Hz"):
            await stage.push(AudioFrame(t=0, samples=quiet(0.02, 8000), sample_rate=8000))
        with pytest.raises(AudioFormatError, match="NaN"):
            await stage.push(
                AudioFrame(t=0, samples=np.full(320, np.nan, np.float32), sample_rate=16000)
            )
        with pytest.raises(AudioFormatError, match="even number of bytes"):
            await stage.push_pcm16(b"\x00\x01\x02", 16000)
        with pytest.raises(AudioFormatError, match="unsupported sample rate"):
            await stage.push(AudioFrame(t=0, samples=quiet(0.02, 16000), sample_rate=11025))
        await stage.close()

    asyncio.run(main())


# --- the shared decode queue ---------------------------------------------------------------


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


async def two_segments(queue: object, events: list) -> AsrStage:
    """A stage on ``queue`` that has heard two segments of speech far apart, frame by frame."""
    clock = VirtualClock()
    stage = AsrStage(
        VoiceActivityDetector(ScriptedVad(), VAD, SAMPLE_RATE),
        StreamingRecognizer(settings()),
        queue,
        clock,
        events.append,
        VAD,
    )
    audio = np.concatenate([tone(0.9), quiet(2.0), tone(0.6), quiet(0.6)])
    for i in range(0, len(audio), 320):
        frame = AudioFrame(t=clock.now(), samples=audio[i : i + 320], sample_rate=SAMPLE_RATE)
        await stage.push(frame)
        await clock.advance(0.02)
        await asyncio.sleep(0)
    return stage


def test_a_streams_finals_are_applied_in_order_when_they_come_back_out_of_order():
    async def main() -> list[TranscriptFinal]:
        events, queue = [], HeldFinals()
        stage = await two_segments(queue, events)
        assert len(queue.held) == 2  # both segments' finals are out, neither is back
        for future, result in reversed(queue.held):  # the second comes back first
            future.set_result(result)
            await asyncio.sleep(0.01)
        await stage.close()
        return [e for e in events if isinstance(e, TranscriptFinal)]

    first, second = asyncio.run(main())
    assert first.words[0].start < 0.9 < second.words[0].start


class StuckPartials:
    """Finals decode at once; partials wait until cancelled (every worker is busy elsewhere)."""

    def __init__(self) -> None:
        self.decoder = ScriptedDecoder()
        self.partials: list[Future[Hypothesis]] = []

    def submit(self, r: DecodeRequest, priority: int) -> Future[Hypothesis]:
        future: Future[Hypothesis] = Future()
        if priority == PARTIAL:
            self.partials.append(future)
        else:
            future.set_running_or_notify_cancel()
            future.set_result(self.decoder(r))
        return future


def test_a_partial_still_waiting_when_its_segment_ends_is_cancelled():
    async def main() -> tuple[list[bool], list]:
        events, queue = [], StuckPartials()
        stage = await two_segments(queue, events)
        cancelled = [job.cancelled() for job in queue.partials]
        for job in queue.partials:  # so that close() cannot wait on one forever
            if job.set_running_or_notify_cancel():
                job.set_result(Hypothesis([]))
        await stage.close()
        return cancelled, events

    cancelled, events = asyncio.run(main())
    assert cancelled == [True, True]  # one per segment: the first one's end freed the stream
    assert sum(isinstance(e, TranscriptFinal) for e in events) == 2
