"""Serving many conversations (fakes for the models, real sockets): transcripts written as
replies end, admission from measured load, draining on shutdown, failing models."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from fakes import REPLY, ScriptedModel
from web_fakes import FakeEngine, ToneStages, pcm, serving, speech

from voice.clock import Clock, RealClock, VirtualClock
from voice.settings import LlmSettings, Settings
from voice.transcripts import TranscriptStore
from web.hub import Hub, Overloaded, SessionLimitReached, ShuttingDown

RATE = 16000
LONG_REPLY = [f" word{i}" for i in range(200)]  # 20 s of audio


class FailingStages(ToneStages):
    """The verifier turns every draft down and the slow model fails before its first word."""

    def __init__(self, clock: Clock, reply: list[str]) -> None:
        super().__init__(clock, reply, accept=False)
        self.slow = ScriptedModel(clock, reply, fail_at=0)


async def events_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict]:
    """JSON events up to and including the first of ``kind`` (audio skipped)."""
    events: list[dict] = []
    async with asyncio.timeout(10):
        while not events or events[-1]["type"] != kind:
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
            if message.type is aiohttp.WSMsgType.TEXT:
                events.append(json.loads(message.data))
    return events


@pytest.fixture
def store(tmp_path):
    store = TranscriptStore(tmp_path / "transcripts.sqlite3")
    yield store
    store.close()


async def test_each_reply_is_in_the_transcripts_as_soon_as_it_ends(store):
    async with serving(store=store) as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{served.url}/v1/pcm?rate={RATE}")
        session_id = (await events_until(ws, "ready"))[-1]["session_id"]
        for n in (1, 2):
            await ws.send_bytes(pcm(speech(RATE)))
            record = (await events_until(ws, "turn_record"))[-1]
            turns = store.export(session_id)["turns"]  # the conversation is still going on
            assert len(turns) == n and turns[-1]["heard_text"] == record["heard_text"]
            assert turns[-1]["timings"]["first_audio_out_ms"] == record["first_audio_out_ms"]
        assert store.export(session_id)["session"]["ended_at"] is None
        await ws.close()
        await asyncio.sleep(0.2)
    exported = store.export(session_id)
    assert exported["session"]["transport"] == "pcm"
    assert exported["session"]["end_reason"] == "conversation ended"
    assert [t["heard_text"] for t in exported["turns"]] == [
        "Yes, I love football because it is fun"
    ] * 2


async def test_three_failed_replies_apologise_then_end_the_session_saying_why(store):
    engine = FakeEngine(stages=FailingStages)
    async with serving(engine, store=store) as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{served.url}/v1/pcm?rate={RATE}")
        session_id = (await events_until(ws, "ready"))[-1]["session_id"]
        for _ in range(2):
            await ws.send_bytes(pcm(speech(RATE)))
            events = await events_until(ws, "turn_record")
            errors = [e for e in events if e["type"] == "error"]
            assert errors and errors[0]["code"] == "llm_error"
            assert events[-1]["heard_text"] == LlmSettings().apology  # spoken, not only shown
        await ws.send_bytes(pcm(speech(RATE)))
        events = await events_until(ws, "error")
        while events[-1].get("code") != "session_failed":
            events += await events_until(ws, "error")
        assert events[-1]["message"].startswith("3 replies failed; the last: llm: reply 3")
        async with asyncio.timeout(5):
            while (await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
                pass
        assert ws.close_code == 1011
        await asyncio.sleep(0.2)
        assert served.hub.metrics.sessions_active == 0
        # the server itself goes on
        again = await http.ws_connect(f"{served.url}/v1/pcm?rate={RATE}")
        assert (await events_until(again, "ready"))[-1]["type"] == "ready"
        await again.close()
    assert store.export(session_id)["session"]["end_reason"].startswith("3 replies failed")


async def test_admission_follows_the_measured_load():
    settings = Settings()
    settings.server.max_sessions = 3
    hub = Hub(FakeEngine(settings), VirtualClock())  # type: ignore[arg-type]
    async with hub.session(RATE, RATE) as first:
        assert hub.refusal() is None
        first.transcript_delays.extend([1.4, 1.6, 1.5])  # recognition 1.5 s behind speech
        with pytest.raises(Overloaded, match="speech recognition is 1500 ms behind"):
            async with hub.session(RATE, RATE):
                pass
        first.transcript_delays.extend([0.2] * 8)  # caught up
        hub._lags.append(0.4)  # the event loop ran 400 ms late
        with pytest.raises(Overloaded, match="400 ms late"):
            async with hub.session(RATE, RATE):
                pass
        hub._lags.clear()
        async with hub.session(RATE, RATE), hub.session(RATE, RATE):
            with pytest.raises(SessionLimitReached):
                async with hub.session(RATE, RATE):
                    pass
        hub.draining = True
        with pytest.raises(ShuttingDown):
            async with hub.session(RATE, RATE):
                pass
    assert hub.metrics.sessions_refused == {
        "server_overloaded": 2,
        "session_limit_reached": 1,
        "server_shutting_down": 1,
    }


async def test_the_loop_lag_probe_sees_a_blocked_event_loop():
    hub = Hub(FakeEngine(), RealClock())  # type: ignore[arg-type]
    hub.start()
    try:
        await asyncio.sleep(0.15)
        time.sleep(0.3)  # the point: work that blocks the loop
        await asyncio.sleep(0.15)
        assert hub.loop_lag_ms >= 200
    finally:
        await hub.close()


@pytest.mark.parametrize(("grace_s", "finished"), [(10.0, True), (0.3, False)])
async def test_drain_lets_replies_finish_within_the_grace_then_stops_them(store, grace_s, finished):
    reply = REPLY if finished else LONG_REPLY
    async with (
        serving(FakeEngine(reply=reply), store=store) as served,
        aiohttp.ClientSession() as http,
    ):
        ws = await http.ws_connect(f"{served.url}/v1/pcm?rate={RATE}")
        session_id = (await events_until(ws, "ready"))[-1]["session_id"]
        await ws.send_bytes(pcm(speech(RATE)))
        await events_until(ws, "reply_text")
        started = time.monotonic()
        await served.hub.drain(grace_s)
        assert time.monotonic() - started < grace_s + 0.5
        record = (await events_until(ws, "turn_record"))[-1]
        assert record["interruption"] == ("" if finished else "shutdown")
        refused = await http.ws_connect(f"{served.url}/v1/pcm?rate={RATE}")
        assert (await events_until(refused, "error"))[-1]["code"] == "server_shutting_down"
    (turn,) = store.export(session_id)["turns"]
    assert turn["interruption"] == record["interruption"]
    assert store.export(session_id)["session"]["end_reason"] == "the server shut down"
