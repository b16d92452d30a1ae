"""The HTTP backend against real servers on 127.0.0.1: llama-cpp-python's OpenAI-compatible
server on the draft model (SmolLM2-135M), and a small stdlib server for the failures a real
one rarely shows on demand (HTTP 500, garbage, a stall, a cut stream)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx2
import pytest
from llama_cpp import Llama

from llm.backend import BackendError, Message
from llm.drafter import LlamaDrafter
from llm.http_backend import HttpBackend, top_logprob_signals
from llm.relay import Relay, strip_seam
from voice.clock import RealClock
from voice.events import ResponseDone, ResponseTextDelta, StageError, TurnEnded, TurnTranscript
from voice.models import resolve
from voice.settings import LlmSettings, Settings

QUESTION = [
    Message(role="system", content="You are a friendly voice assistant. Reply briefly."),
    Message(role="user", content="Do you like football?"),
]
BOUND_S = 60  # a test that has not finished by then hangs: it fails instead


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def collect(backend: HttpBackend, messages=QUESTION, prefix="", limit=24) -> list:
    return [t async for t in backend.stream(messages, prefix, limit)]


def bounded(coro):
    """Run ``coro``, failing (not hanging) past BOUND_S."""
    return asyncio.run(asyncio.wait_for(coro, BOUND_S))


def test_signals_from_top_logprobs():
    logprob, entropy, margin = top_logprob_signals(math.log(0.5), [math.log(0.5), math.log(0.25)])
    assert logprob == pytest.approx(math.log(0.5))
    assert entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert margin == pytest.approx(math.log(2))
    # the chosen token missing from the top-k still counts; rounding past 1 is renormalised
    assert top_logprob_signals(math.log(0.1), [math.log(0.6)])[2] == pytest.approx(math.log(6))
    assert top_logprob_signals(0.0, [0.0, -40.0])[1] == pytest.approx(0.0, abs=1e-12)


# --- llama-cpp-python's server on the real draft model -------------------------------------


@pytest.fixture(scope="module")
def model_file() -> Path:
    return resolve("draft-llm", Settings.load(env={})).path


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL, log file) of a llama-cpp-python server on the draft model."""
    pytest.importorskip(
        "llama_cpp.server.app",
        reason="llama-cpp-python's server extra is missing: pip install -e '.[dev]'",
    )
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(model_file), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", *args],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its disconnect report, at once
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx2.get(f"{base_url}/models", timeout=2).is_success:
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield base_url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def template_file(model_file, tmp_path_factory) -> Path:
    """The draft model's own chat template, as a user would save it for
    ``llm.http_chat_template``."""
    vocab = Llama(str(model_file), vocab_only=True, verbose=False)
    path = tmp_path_factory.mktemp("template") / "chat_template.jinja"
    path.write_text(vocab.metadata["tokenizer.chat_template"])
    return path


@pytest.fixture
def chat(server) -> HttpBackend:
    return HttpBackend("slow", server[0], model="")


@pytest.fixture
def completions(server, template_file) -> HttpBackend:
    settings = LlmSettings(http_base_url=server[0], http_chat_template=str(template_file))
    return HttpBackend.from_settings("slow", settings)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_streams_a_reply_with_verifier_signals(request, mode):
    backend = request.getfixturevalue(mode)
    tokens = bounded(collect(backend, limit=16))
    assert 0 < len(tokens) <= 16 and "".join(t.text for t in tokens).strip()
    for t in tokens:
        assert math.isfinite(t.logprob) and math.isfinite(t.entropy) and math.isfinite(t.margin)
        assert t.logprob <= 0 and t.entropy >= 0 and t.margin >= 0


@pytest.mark.integration
def test_continues_a_committed_prefix_without_repeating_it(completions):
    async def main():
        await completions.prefill(QUESTION)
        return await collect(completions, prefix="Yes, I love", limit=12)

    text = "".join(t.text for t in bounded(main()))
    assert text.strip() and strip_seam("Yes, I love", text) == text
    assert not text.strip().lower().startswith(("yes", "i "))  # not a new turn either


@pytest.mark.integration
def test_closing_the_stream_stops_the_server_and_it_answers_the_next_request(chat, server):
    def disconnects() -> int:  # the server's own report of a client gone mid-reply
        return server[1].read_text().count("Disconnected from client")

    async def main():
        before = disconnects()
        stream = chat.stream(QUESTION, max_tokens=400)
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        while disconnects() == before:
            await asyncio.sleep(0.05)
        return first, await collect(chat, limit=5)

    first, second = bounded(main())
    assert len(first) == 2 and 0 < len(second) <= 5


@pytest.mark.integration
def test_prefill_then_reply(chat):
    async def main():
        await chat.prefill(QUESTION[:1])
        return await collect(chat, limit=4)

    assert bounded(main())


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["cascaded", "relay"])
def test_the_relay_answers_through_the_server(request, mode):
    backend = request.getfixturevalue("completions")
    settings = LlmSettings(mode=mode, max_reply_tokens=24)
    events: list = []

    class AcceptEveryDraft:
        async def read(self, history, transcript) -> None:
            pass

        async def accept(self, history, draft) -> bool:
            return True

    async def main():
        drafter = LlamaDrafter(backend, settings)  # the drafter too speaks HTTP here
        relay = Relay(settings, drafter, AcceptEveryDraft(), backend, RealClock(), events.append)
        relay.on_event(TurnEnded(t=0, transcript="Do you like football?", reason="test"))
        relay.on_event(TurnTranscript(t=0, transcript="Do you like football?"))
        await relay.wait()

    bounded(main())
    assert not [e for e in events if isinstance(e, StageError)]
    (done,) = [e for e in events if isinstance(e, ResponseDone)]
    deltas = [e for e in events if isinstance(e, ResponseTextDelta)]
    assert done.text and done.text == "".join(d.text for d in deltas).strip()
    if mode == "relay":
        assert [d.source for d in deltas][:2] == ["prefix", "continuation"]


# --- failures ------------------------------------------------------------------------------

CHUNK = {"choices": [{"delta": {"content": "Hi"}, "logprobs": None}]}


class Faulty(BaseHTTPRequestHandler):
    """Answers by the first path segment: /500, /garbage, /html, /cut, /stall, /record."""

    released = threading.Event()  # set at teardown: a stalled answer ends
    bodies: ClassVar[list] = []  # (Authorization, JSON body) of each request to /record

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = self.path.split("/")[1]
        if kind == "500":
            return self.answer(500, "application/json", b'{"error": "model crashed"}')
        if kind == "html":
            return self.answer(200, "text/html", b"<html>not an event stream</html>")
        self.answer(200, "text/event-stream", b"data: " + json.dumps(CHUNK).encode() + b"\n\n")
        if kind == "garbage":
            self.wfile.write(b"data: {this is not json\n\n")
        elif kind == "stall":
            self.wfile.flush()
            self.released.wait(BOUND_S)
        elif kind == "record":
            self.bodies.append((self.headers["Authorization"], body))
            self.wfile.write(b"data: [DONE]\n\n")
        # cut: the connection closes without [DONE]

    def answer(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def faulty() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Faulty)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    Faulty.released.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("500", "answered HTTP 500: .*model crashed"),
        ("garbage", "malformed event"),
        ("html", "text/event-stream"),
        ("cut", "ended without \\[DONE\\]"),
        ("stall", "no answer within 0.5 s"),
    ],
)
def test_a_failing_server_raises_backend_error_naming_it(faulty, kind, message):
    backend = HttpBackend("slow", f"{faulty}/{kind}", model="", timeout_s=0.5)
    tokens: list = []

    async def main():
        async for token in backend.stream(QUESTION):
            tokens.append(token)

    with pytest.raises(BackendError, match=message) as error:
        bounded(main())
    assert f"{faulty}/{kind}/chat/completions" in str(error.value)
    assert [t.text for t in tokens] == ([] if kind in ("500", "html") else ["Hi"])


def test_a_server_that_is_down_fails_at_once():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backend = HttpBackend("slow", url, model="")
    with pytest.raises(BackendError, match="cannot connect"):
        bounded(collect(backend))
    with pytest.raises(BackendError, match=url):
        bounded(backend.prefill(QUESTION))


def test_a_prefix_in_chat_mode_asks_to_continue_the_final_message(faulty):
    backend = HttpBackend("slow", f"{faulty}/record", model="m", api_key="k")
    tokens = bounded(collect(backend, prefix="Yes, I love", limit=7))
    assert [t.text for t in tokens] == ["Hi"] and math.isnan(tokens[0].logprob)
    authorization, body = Faulty.bodies[-1]
    assert authorization == "Bearer k"
    assert body["messages"][-1] == {"role": "assistant", "content": "Yes, I love"}
    assert body["continue_final_message"] and body["add_generation_prompt"] is False
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["top_logprobs"] > 1
