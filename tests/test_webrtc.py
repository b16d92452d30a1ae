"""The WebRTC transport over real connections on 127.0.0.1: signalling errors, an aiortc peer
standing in for a browser (audio both ways, the events channel, keep-alive, shutdown), and the
page itself in headless Chromium with a recorded sentence as its microphone.

The pipeline behind the hub is a real ``Session`` with scripted stages: a listener that says
a scripted user turn once it has heard a second of sound, the real relay over scripted models,
and a voice that speaks each text delta as a 440 Hz tone (constant audio would be removed by
Opus's DC filter and arrive as silence)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from fakes import FakeAsr, FakeStages, FakeVoice
from playwright.async_api import Browser, Page, async_playwright, expect
from web_fakes import FakeEngine, serving

from eval.datasets import LIBRIVOX_DIR
from voice.audio import read_wav, resample, write_wav
from voice.clock import Clock
from voice.events import (
    AudioFrame,
    SpeechEnded,
    SpeechStarted,
    TranscriptPartial,
    TurnEnded,
    TurnTranscript,
)
from voice.session import Observer
from web import webrtc

CHROMIUM = Path("/usr/bin/chromium")
USER_TEXT = "Do you like football"
TONE_HZ = 440.0
WORD_S = 0.2


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


# --- the scripted pipeline -------------------------------------------------------------------


class ScriptedListener(FakeAsr):
    """Says the scripted user turn once, after a second of sound (RMS above 0.01)."""

    def __init__(self, clock: Clock, emit: Observer) -> None:
        super().__init__()
        self.clock, self.emit = clock, emit
        self.voiced = 0.0

    async def push(self, frame: AudioFrame) -> None:
        await super().push(frame)
        before = self.voiced
        if rms(frame.samples) > 0.01:
            self.voiced += frame.duration
        now = self.clock.now()
        if before < 0.2 <= self.voiced:
            self.emit(SpeechStarted(t=now, audio_time=now))
        if before < 0.6 <= self.voiced:
            self.emit(TranscriptPartial(t=now, committed="Do you", tentative="like"))
        if before < 1.0 <= self.voiced:
            self.emit(SpeechEnded(t=now, audio_time=now))
            self.emit(TurnEnded(t=now, transcript=USER_TEXT, reason="scripted"))
            self.emit(TurnTranscript(t=now, transcript=USER_TEXT))


class ScriptedStages(FakeStages):
    """The listener's script ends the turn; the voice speaks each word, punctuation included,
    as ``WORD_S`` of tone (constant audio would be removed by Opus's DC filter)."""

    def __init__(self, clock: Clock, reply: list[str]) -> None:
        super().__init__(clock, reply, step=0.04)

    def asr(self, clock: Clock, emit: Observer, input_rate: int) -> ScriptedListener:
        assert input_rate == webrtc.RATE
        return ScriptedListener(clock, emit)

    def voice(self, clock: Clock, emit: Observer, output_rate: int) -> FakeVoice:
        return FakeVoice(
            clock, emit, output_rate, word_s=WORD_S, level=0.3, tone_hz=TONE_HZ, punctuation=True
        )


def scripted_engine(max_sessions: int = 4) -> FakeEngine:
    engine = FakeEngine(stages=ScriptedStages)
    engine.settings.server.max_sessions = max_sessions
    return engine


# --- waiting and posting ---------------------------------------------------------------------


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        await asyncio.sleep(0.05)


async def post(url: str, body: str | bytes) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{webrtc.OFFER_PATH}", data=body) as response,
    ):
        return response.status, await response.json()


# --- an aiortc peer in place of the browser --------------------------------------------------


class ToneTrack(MediaStreamTrack):
    """A microphone saying a steady 440 Hz tone, 20 ms frames in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start = time.monotonic()

    async def recv(self) -> av.AudioFrame:
        await asyncio.sleep(max(0.0, self._start + self._pts / 48000 - time.monotonic()))
        t = (np.arange(960) + self._pts) / 48000
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self._pts, Fraction(1, 48000)
        self._pts += 960
        return frame


class Caller:
    """A Python WebRTC peer that talks to the server the way the page does."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack())
        self.channel = self.pc.createDataChannel("events")
        self.messages: list[dict[str, Any]] = []
        self.heard: list[np.ndarray] = []
        self._readers: list[asyncio.Task[None]] = []
        self.channel.on("message", lambda data: self.messages.append(json.loads(data)))
        self.pc.on(
            "track", lambda track: self._readers.append(asyncio.ensure_future(self._read(track)))
        )

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                self.heard.append(webrtc.mono_float32(await track.recv()))
        except MediaStreamError:
            pass

    async def call(self, url: str, mode: str | None = None) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer", "mode": mode}
        status, answer = await post(url, json.dumps(offer))
        assert status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    async def hang_up(self) -> None:
        await self.pc.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def test_bad_offers_are_refused_with_a_json_error():
    engine = scripted_engine()
    engine.settings.server.max_message_bytes = 8192
    no_audio = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    no_audio.createDataChannel("events")
    await no_audio.setLocalDescription(await no_audio.createOffer())
    data_only = no_audio.localDescription.sdp
    await no_audio.close()
    async with serving(engine) as served:
        cases = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_request"),
            (json.dumps({"type": "offer"}), "invalid_request"),
            (json.dumps({"sdp": data_only, "type": "answer"}), "invalid_request"),
            (json.dumps({"sdp": data_only, "type": "offer", "mode": "loud"}), "invalid_mode"),
            (
                json.dumps({"sdp": "m=audio 9 UDP/TLS/RTP/SAVPF abc", "type": "offer"}),
                "invalid_sdp",
            ),
            (json.dumps({"sdp": "garbage", "type": "offer"}), "no_audio"),
            (json.dumps({"sdp": data_only, "type": "offer"}), "no_audio"),
            (json.dumps({"sdp": "v=0\r\nm=audio 9 RTP/AVP 0\r\n", "type": "offer"}), "invalid_sdp"),
        ]
        for body, code in cases:
            status, answer = await post(served.url, body)
            assert (status, answer["error"]["code"]) == (400, code), body
            assert answer["error"]["message"]
        status, answer = await post(served.url, json.dumps({"sdp": "a" * 8192, "type": "offer"}))
        assert (status, answer["error"]["code"]) == (413, "too_large")
    # only the last offer got as far as a session (aiortc refused it), which was closed at once
    assert (served.hub.metrics.sessions_total, served.hub.metrics.sessions_active) == (1, 0)


async def test_a_full_server_answers_503_before_any_connection_is_made():
    engine = scripted_engine(max_sessions=0)
    caller = Caller()
    async with serving(engine) as served:
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        status, answer = await post(
            served.url, json.dumps({"sdp": caller.pc.localDescription.sdp, "type": "offer"})
        )
    await caller.hang_up()
    assert status == 503 and answer["error"]["code"] == "session_limit_reached"
    assert served.hub.metrics.sessions_refused == {"session_limit_reached": 1}
    assert not engine.sessions


async def test_a_peer_talks_to_the_session_and_hears_the_reply_as_it_plays():
    engine = scripted_engine()
    caller = Caller()
    async with serving(engine) as served:
        await caller.call(served.url, mode="cascaded")
        await until(lambda: caller.of("ready"), 5, "ready message")
        assert caller.of("ready")[0]["mode"] == "cascaded"
        caller.send({"type": "ping"})
        caller.send({"type": "mode", "mode": "relay"})
        caller.send({"type": "shout"})
        await until(lambda: caller.of("pong") and caller.of("mode"), 5, "pong and mode")
        assert engine.sessions[0].mode == "relay"
        assert caller.of("error")[0]["code"] == "bad_message"

        await until(lambda: caller.of("turn_latency"), 15, "finished reply")
        (session,) = engine.sessions
        heard_in = np.concatenate([f.samples for f in session.asr.frames])
        assert rms(heard_in) > 0.1  # the tone, through Opus both ways
        assert [m["text"] for m in caller.of("transcript_final")] == [USER_TEXT]
        assert caller.of("speech_started") and caller.of("transcript_partial")
        spoken = "".join(m["text"] for m in caller.of("reply_text"))
        assert spoken == "Yes, I love football because it is fun."
        (record,) = engine.sessions[0].records
        assert record.heard_text.split() == spoken.replace(".", " .").split()
        (latency,) = caller.of("turn_latency")
        assert latency["verdict"] == "accepted" and latency["prefix_text"] == "Yes, I love"
        onset = latency["ms"]["first_audio_out"]
        assert 0 < latency["ms"]["first_text"] < onset < 2000
        first_reply_text = caller.messages.index(caller.of("reply_text")[0])
        assert caller.messages.index(latency) > first_reply_text  # text as it is heard
        assert rms(np.concatenate(caller.heard)) > 0.01  # the reply's tone arrived

        await caller.hang_up()
        await until(lambda: served.hub.metrics.sessions_active == 0, 5, "session ended by hang-up")


async def test_a_barge_in_stops_the_reply_text_where_its_audio_stopped():
    engine = scripted_engine()
    caller = Caller()
    async with serving(engine) as served:
        await caller.call(served.url)
        await until(lambda: caller.of("reply_text"), 15, "the reply's first words")
        session, now = engine.sessions[0], time.monotonic()
        session.route(SpeechStarted(t=now, audio_time=now))
        session.route(TranscriptPartial(t=now, committed="tell me about tennis", tentative=""))
        await until(lambda: caller.of("turn_latency"), 5, "the cut reply's timeline")
        await asyncio.sleep(1.0)  # the rest of the reply's audio would have started by now
        await caller.hang_up()
    (interrupted,) = caller.of("interrupted")
    assert interrupted["reason"] == "barge-in"
    shown = [m for m in caller.messages if m["type"] == "reply_text"]
    assert all(caller.messages.index(m) < caller.messages.index(interrupted) for m in shown)
    full = "Yes, I love football because it is fun."
    assert full.startswith("".join(m["text"] for m in shown)) and len(shown) < 5  # of 5 chunks
    (latency,) = caller.of("turn_latency")
    assert latency["interruption"] == "barge-in"


async def test_a_silent_peer_is_dropped_and_shutdown_closes_the_rest(monkeypatch):
    monkeypatch.setattr(webrtc, "PEER_TIMEOUT_S", 1.0)
    engine = scripted_engine()
    silent, chatty = Caller(), Caller()
    async with serving(engine) as served:
        await silent.call(served.url)
        await chatty.call(served.url)
        assert served.hub.metrics.sessions_active == 2
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            if chatty.channel.readyState == "open":
                chatty.send({"type": "ping"})
            await asyncio.sleep(0.3)
        assert served.hub.metrics.sessions_active == 1  # the caller that never pinged is gone
        assert silent.of("closed") and not chatty.of("closed")
        assert "no message" in silent.of("closed")[0]["reason"]
    assert served.hub.metrics.sessions_active == 0  # app shutdown ended the other
    await silent.hang_up()
    await chatty.hang_up()


# --- the page in headless Chromium -----------------------------------------------------------


def fake_microphone(tmp_path: Path, sentence: str, lead_s: float = 0.0) -> Path:
    """A LibriVox sentence after ``lead_s`` of silence, as a 48 kHz WAV for Chromium's fake
    capture device (which starts playing it at getUserMedia, before the call is up)."""
    samples, rate = read_wav(LIBRIVOX_DIR / f"sense_and_sensibility_01_austen_64kb-{sentence}.wav")
    samples = np.concatenate([np.zeros(round(lead_s * 48000)), resample(samples, rate, 48000)])
    path = tmp_path / f"mic-{sentence}.wav"
    write_wav(path, samples.astype(np.float32), 48000)
    return path


@asynccontextmanager
async def chromium(microphone: Path, allow_microphone: bool = True) -> AsyncIterator[Browser]:
    """Headless Chromium (Debian's) whose microphone plays ``microphone`` once, then silence;
    the user grants it to the page, or refuses."""
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium (make setup)"
    args = [
        "--use-fake-ui-for-media-stream" if allow_microphone else "--deny-permission-prompts",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-features=WebRtcHideLocalIpsWithMdns",  # real host candidates, no multicast
        # no traffic of its own (updates, sync, metrics, first-run and default-app fetches);
        # Playwright passes most of these already, not --disable-sync or domain reliability
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--metrics-recording-only",
        "--disable-domain-reliability",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def connect(page: Page, url: str) -> None:
    """Open the page at ``url`` and press Connect."""
    await page.goto(url)
    await page.click("#connect")


async def test_the_page_shows_the_conversation_and_its_latency(tmp_path):
    engine = scripted_engine()
    microphone = fake_microphone(tmp_path, "0880")
    async with serving(engine) as served, chromium(microphone) as browser:
        page = await browser.new_page()
        await connect(page, f"{served.url}/")
        await expect(page.locator("#state")).to_have_text("connected", timeout=10_000)
        await expect(page.locator(".turn.user.final .said")).to_have_text(USER_TEXT, timeout=15_000)
        reply = page.locator(".turn.assistant .said")
        await expect(reply).to_have_text("Yes, I love football because it is fun.", timeout=15_000)
        await expect(page.locator("#latency tbody tr")).to_have_count(1, timeout=10_000)
        onset = await page.locator("#latency td.onset").text_content()
        assert onset is not None and 0 < int(onset) < 2000
        await page.wait_for_function(
            "Number(document.getElementById('link').dataset.audioEnergy) > 0", timeout=10_000
        )
        assert await page.locator("#error").is_hidden()

        (session,) = engine.sessions
        assert rms(np.concatenate([f.samples for f in session.asr.frames])) > 0.01

        await page.click("#connect")
        await expect(page.locator("#state")).to_have_text("not connected")
        await until(
            lambda: served.hub.metrics.sessions_active == 0, 12, "session ended by the page"
        )


async def test_the_page_sends_its_token_and_says_what_went_wrong(tmp_path):
    engine = scripted_engine(max_sessions=0)
    engine.settings.server.token = "s3cret"
    microphone = fake_microphone(tmp_path, "0880")
    async with serving(engine) as served, chromium(microphone) as browser:
        page = await browser.new_page()
        await connect(page, f"{served.url}/")
        await expect(page.locator("#error")).to_contain_text("?token=", timeout=10_000)
        await connect(page, f"{served.url}/?token=s3cret")  # let in, but every slot is taken
        await expect(page.locator("#error")).to_contain_text("server is full", timeout=10_000)
        await expect(page.locator("#connect")).to_have_text("Connect")
    assert served.hub.metrics.sessions_refused == {"session_limit_reached": 1}


async def test_the_page_says_when_the_microphone_is_refused(tmp_path):
    engine = scripted_engine()
    microphone = fake_microphone(tmp_path, "0880")
    async with (
        serving(engine) as served,
        chromium(microphone, allow_microphone=False) as browser,
    ):
        page = await browser.new_page()
        await connect(page, f"{served.url}/")
        await expect(page.locator("#error")).to_contain_text("Microphone access was denied")
        await expect(page.locator("#connect")).to_have_text("Connect")
    assert served.hub.metrics.sessions_total == 0


async def test_incoming_audio_is_decoded_as_each_packet_arrives():
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("audio", direction="recvonly")
    receiver = transceiver.receiver
    assert receiver._RTCRtpReceiver__jitter_buffer._prefetch == 4  # aiortc's own: 80 ms
    webrtc.decode_audio_at_once(pc, receiver.track)
    assert isinstance(receiver._RTCRtpReceiver__jitter_buffer, webrtc.AudioJitterBuffer)
    await pc.close()


def opus_packet(sequence_number: int) -> RtpPacket:
    packet = RtpPacket(sequence_number=sequence_number % 65536, timestamp=960 * sequence_number)
    packet._data = bytes([sequence_number % 256])
    return packet


def frames_out(buffer: webrtc.AudioJitterBuffer, numbers: list[int]) -> list[int | None]:
    out = []
    for n in numbers:
        _, frame = buffer.add(opus_packet(n))
        out.append(None if frame is None else frame.data[0])
    return out


def test_the_audio_buffer_hands_on_every_packet_in_order_without_waiting():
    buffer = webrtc.AudioJitterBuffer()
    assert frames_out(buffer, [65530 + i for i in range(12)]) == [
        (65530 + i) % 256 for i in range(12)
    ]  # across the sequence number's wrap


def test_a_lost_packet_is_skipped_and_a_late_one_dropped_so_delay_never_builds_up():
    buffer = webrtc.AudioJitterBuffer()
    assert frames_out(buffer, [1, 2, 4, 3, 5, 40, 41]) == [1, 2, 4, None, 5, 40, 41]
