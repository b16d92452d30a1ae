"""`relayvoice serve` on the real models: the official ``openai`` SDK streams a LibriVox sentence
into ``/v1/realtime`` in real time and gets a transcript and a spoken reply back."""

from __future__ import annotations

import asyncio
import base64
import itertools

import numpy as np
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from eval.datasets import librivox
from voice.audio import float32_to_pcm16, resample
from voice.engine import Engine
from voice.settings import Settings
from web.hub import Hub
from web.server import create_app

pytestmark = pytest.mark.integration

RATE = 24000
CHUNK_S = 0.1


async def microphone(connection, audio: np.ndarray) -> None:
    """The sentence, then silence, in 100 ms appends paced on the clock, until cancelled."""
    step = round(CHUNK_S * RATE)
    loop = asyncio.get_running_loop()
    deadline = loop.time()
    for i in itertools.count():
        chunk = audio[i * step : (i + 1) * step]
        if len(chunk) < step:
            chunk = np.concatenate([chunk, np.zeros(step - len(chunk), np.float32)])
        await connection.input_audio_buffer.append(
            audio=base64.b64encode(float32_to_pcm16(chunk)).decode()
        )
        deadline += CHUNK_S
        await asyncio.sleep(max(0.0, deadline - loop.time()))


async def test_the_sdk_hears_a_real_reply():
    sentence = next(u for u in librivox() if u.id.endswith("0870"))
    audio = resample(sentence.audio, sentence.sample_rate, RATE)
    settings = Settings.load(env={})
    engine = Engine(settings)
    runner = web.AppRunner(create_app(Hub(engine), settings))
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        client = AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused")
        events = []
        async with client.realtime.connect(model="relayvoice") as connection:
            talking = asyncio.create_task(microphone(connection, audio))
            try:
                async with asyncio.timeout(len(audio) / RATE + 60):
                    async for event in connection:
                        events.append(event)
                        if event.type == "response.done":
                            break
            finally:
                talking.cancel()
                await asyncio.gather(talking, return_exceptions=True)
    finally:
        await runner.cleanup()
        engine.close()
    kinds = [e.type for e in events]
    completed = [e for e in events if e.type.endswith("input_audio_transcription.completed")]
    assert completed and "dashwood" in completed[0].transcript.lower(), completed
    assert "response.output_audio.delta" in kinds
    done = events[-1]
    assert done.response.status == "completed", done
    assert done.response.output[0].content[0].transcript.strip()
