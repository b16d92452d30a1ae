"""The browser demo on the real models: headless Chromium says a LibriVox sentence into the
page's microphone, and the page shows what was heard, the reply as it is spoken, and the
turn's latency."""

from __future__ import annotations

import contextlib
import re

import pytest
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import expect
from test_webrtc import chromium, fake_microphone
from web_fakes import serving

from voice.engine import Engine
from voice.settings import Settings

pytestmark = pytest.mark.integration

SENTENCE = "0880"  # "he was not an ill disposed young man", 3 s


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(Settings.load(env={}))
    yield engine
    engine.close()


async def test_the_page_talks_with_the_real_engine(engine, tmp_path):
    # the fake microphone starts at getUserMedia: speak once the call is surely up
    microphone = fake_microphone(tmp_path, SENTENCE, lead_s=3.0)
    async with serving(engine) as served, chromium(microphone) as browser:
        page = await browser.new_page()
        screenshot = tmp_path / "page.png"
        try:
            await page.goto(f"{served.url}/")
            await page.click("#connect")
            await expect(page.locator("#state")).to_have_text("connected", timeout=20_000)
            heard = page.locator(".turn.user.final .said")
            await expect(heard).to_contain_text(
                re.compile(r"\b(not|ill|disposed|young|man)\b", re.IGNORECASE), timeout=60_000
            )
            await expect(page.locator(".turn.assistant .said")).to_have_text(
                re.compile(r"[A-Za-z]{2,}"), timeout=90_000
            )
            await page.wait_for_function(
                "Number(document.getElementById('link').dataset.audioEnergy) > 0", timeout=60_000
            )
            await expect(page.locator("#latency tbody tr")).to_have_count(1, timeout=120_000)
            onset = await page.locator("#latency td.onset").text_content()
            assert onset is not None and onset.isdigit(), onset
            assert await page.locator("#error").is_hidden()
        finally:
            with contextlib.suppress(PlaywrightError):  # not to hide why it failed
                await page.screenshot(path=screenshot, full_page=True)
            print(f"screenshot of the page: {screenshot}")
    assert screenshot.exists()
