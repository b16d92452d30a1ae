"""The HTTP side of `relayvoice serve` over real sockets: health, metrics, static files (and
every way out of their folder), token, origin and host checks, and the CLI's refusal to
listen off loopback without a token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
from web_fakes import FakeEngine, serving

import web.server
from voice.cli import main
from voice.settings import Settings, SettingsError
from voice.transcripts import TranscriptStore


def secured(**server: object) -> FakeEngine:
    settings = Settings()
    for name, value in server.items():
        setattr(settings.server, name, value)
    return FakeEngine(settings)


async def raw_get(url: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A GET with the request target exactly as given (clients normalise ``..`` away)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    fields = {"Host": f"{host}:{port}", "Connection": "close", **(headers or {})}
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = (await reader.read()).decode(errors="replace")
    writer.close()
    await writer.wait_closed()
    return int(response.split()[1]), response


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<h1>relayvoice</h1>")
    (static / "app.js").write_text("console.log('hi')")
    (static / ".env").write_text("HIDDEN")
    os.symlink(tmp_path / "secret.txt", static / "link.txt")
    os.symlink(tmp_path, static / "up")
    return static


async def test_health_and_metrics():
    async with serving() as served, aiohttp.ClientSession() as http:
        async with http.get(f"{served.url}/healthz") as r:
            assert r.status == 200
            health = await r.json()
            assert health["ok"] and health["sessions"] == {"active": 0, "max": 1}
            assert health["loop_lag_ms"] >= 0 and health["transcript_delay_ms"] == 0
        served.hub.draining = True  # what SIGTERM does first: a load balancer looks elsewhere
        async with http.get(f"{served.url}/healthz") as r:
            assert r.status == 503
            assert (await r.json())["refused"]["code"] == "server_shutting_down"
        served.hub.draining = False
        async with http.get(f"{served.url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await r.text()
    assert "# TYPE relayvoice_sessions_active gauge\nrelayvoice_sessions_active 0\n" in text
    assert 'relayvoice_onset_ms_bucket{le="+Inf"} 0' in text
    assert "\nrelayvoice_prompt_cache_bytes 0\n" in text


async def test_the_page_and_its_files_are_served(static_dir):
    async with serving(static_dir=static_dir) as served, aiohttp.ClientSession() as http:
        async with http.get(f"{served.url}/") as r:
            assert r.status == 200 and await r.text() == "<h1>relayvoice</h1>"
            assert r.headers["Content-Type"].startswith("text/html")
        async with http.get(f"{served.url}/static/app.js") as r:
            assert r.status == 200 and await r.text() == "console.log('hi')"


@pytest.mark.parametrize(
    "target",
    [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E%2Fsecret.txt",
        "/static/..%2fsecret.txt",
        "/static//etc/passwd",
        "/static/%2Fetc%2Fpasswd",
        "/static/link.txt",  # a symlink out of the folder
        "/static/up/secret.txt",  # a symlinked folder out of it
        "/static/.env",
        "/static/missing.js",
        "/static/app.js%00.txt",
    ],
)
async def test_no_way_out_of_the_static_folder(static_dir, target):
    async with serving(static_dir=static_dir) as served:
        status, response = await raw_get(served.url, target)
    assert status == 404, response
    assert "TOP SECRET" not in response and "root:" not in response and "HIDDEN" not in response


async def test_the_token_is_required_where_set_and_accepted_in_three_places():
    async with serving(secured(token="s3cret")) as served, aiohttp.ClientSession() as http:
        pcm = f"{served.url}/v1/pcm"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(pcm, headers=headers)
            assert refused.value.status == 401
        async with http.get(f"{served.url}/metrics") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.json())["error"]["code"] == "unauthorized"
        async with http.get(f"{served.url}/healthz") as r:
            assert r.status == 200  # load balancers probe without credentials
        async with http.ws_connect(pcm, headers={"Authorization": "Bearer s3cret"}) as ws:
            assert json.loads((await ws.receive()).data)["type"] == "ready"
        async with http.ws_connect(f"{pcm}?token=s3cret") as ws:
            assert json.loads((await ws.receive()).data)["type"] == "ready"
        protocols = ("realtime", "openai-insecure-api-key.s3cret")
        async with http.ws_connect(f"{served.url}/v1/realtime", protocols=protocols) as ws:
            assert ws.protocol == "realtime"  # the key itself is never echoed
            assert json.loads((await ws.receive()).data)["type"] == "session.created"
        async with http.get(f"{served.url}/metrics?token=s3cret") as r:
            assert r.status == 200


async def test_browsers_from_other_origins_are_refused():
    engine = secured(allowed_origins="https://app.example, http://localhost:3000/")
    async with serving(engine) as served, aiohttp.ClientSession() as http:
        pcm = f"{served.url}/v1/pcm"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(pcm, headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        async with http.get(f"{served.url}/healthz", headers={"Origin": "null"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_origin"
        for origin in (served.url, "https://app.example", "http://localhost:3000"):
            async with http.ws_connect(pcm, headers={"Origin": origin}) as ws:
                assert json.loads((await ws.receive()).data)["type"] == "ready"


async def test_without_a_token_only_loopback_names_are_answered():
    """A page whose name was rebound to 127.0.0.1 (DNS rebinding) is refused."""
    async with serving() as served:
        for host in ("evil.example:80", "127.0.0.1.evil.example", "[::2]:80", "a b", ""):
            status, response = await raw_get(served.url, "/healthz", {"Host": host})
            assert status == 403 and "forbidden_host" in response, host
        for host in ("localhost:8080", "127.0.0.1", "[::1]:80", "app.localhost", "::1"):
            status, response = await raw_get(served.url, "/healthz", {"Host": host})
            assert status == 200, response
    async with serving(secured(token="t")) as served, aiohttp.ClientSession() as http:
        headers = {"Host": "voice.example", "Authorization": "Bearer t"}
        async with http.get(f"{served.url}/metrics", headers=headers) as r:
            assert r.status == 200  # with a token the name does not matter


def test_serve_refuses_to_listen_off_loopback_without_a_token(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "server.token" in err and "0.0.0.0" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def engines(monkeypatch) -> list[FakeEngine]:
    """``serve`` builds scripted engines instead of loading the models."""
    built: list[FakeEngine] = []

    def build(settings: Settings) -> FakeEngine:
        built.append(FakeEngine(settings))
        return built[-1]

    monkeypatch.setattr(web.server, "Engine", build)
    return built


async def test_serve_runs_until_sigterm_then_ends_every_conversation_and_the_engine(
    engines, capsys
):
    settings = Settings()
    settings.server.port = free_port()
    url = f"http://127.0.0.1:{settings.server.port}"
    server = asyncio.create_task(web.server.serve(settings))
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(5):
            while "serving on" not in capsys.readouterr().err:
                await asyncio.sleep(0.02)
        ws = await http.ws_connect(f"{url}/v1/pcm")
        assert json.loads((await ws.receive()).data)["type"] == "ready"
        os.kill(os.getpid(), signal.SIGTERM)
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
        await asyncio.wait_for(server, 5)
    assert engines[0].closed and engines[0].sessions
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers removed
    store = TranscriptStore(settings.server.transcripts)  # under the test's XDG_DATA_HOME
    (session,) = store.sessions()
    assert session.end_reason == "the server shut down" and session.transport == "pcm"
    store.close()


async def test_a_busy_port_is_one_clear_error(engines):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = Settings()
        settings.server.port = busy.getsockname()[1]
        with pytest.raises(
            SettingsError, match=f"cannot listen on 127.0.0.1:{settings.server.port}"
        ):
            await web.server.serve(settings)
    assert engines[0].closed
