"""`relayvoice serve`: one aiohttp application for every transport.

Routes: ``GET /`` (the browser demo) and ``GET /static/{path}``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), ``GET /v1/realtime`` (the OpenAI Realtime API,
``web/realtime.py``), ``GET /v1/pcm`` (raw PCM, ``web/pcm.py``) and the WebRTC signalling
(``web/webrtc.py``). Who may call them is ``web/access.py``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from yarl import URL

from voice.engine import Engine
from voice.settings import Settings, SettingsError
from voice.transcripts import TranscriptStore
from web import webrtc
from web.access import check_exposure, refusal
from web.hub import Hub
from web.pcm import pcm_endpoint
from web.realtime import realtime_endpoint
from web.websocket import HUB, LINKS, SEND_QUEUE_BYTES, SETTINGS, Link

STATIC_DIR = Path(__file__).parent / "static"
STATIC_KEY = web.AppKey("static_dir", Path)
# What one client may leave unread before it is closed as too slow: ~8 s of the Realtime
# API's base64 audio, ~16 s of 16 kHz PCM.
DEFAULT_SEND_QUEUE_BYTES = 512 * 1024
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger(__name__)


def create_app(
    hub: Hub,
    settings: Settings,
    *,
    static_dir: Path = STATIC_DIR,
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
) -> web.Application:
    """The application around ``hub``: routes, access control, and every websocket closed
    (1001) when it shuts down."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = refusal(request, settings.server)
        return refused if refused is not None else await handler(request)

    app = web.Application(middlewares=[access])
    app[HUB], app[SETTINGS] = hub, settings
    app[STATIC_KEY] = static_dir.resolve()
    app[SEND_QUEUE_BYTES] = send_queue_bytes
    app[LINKS] = set()
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.*}", static)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/realtime", realtime_endpoint)
    app.router.add_get("/v1/pcm", pcm_endpoint)
    webrtc.add_routes(app, hub, settings)
    app.on_shutdown.append(_close_links)
    return app


async def _close_links(app: web.Application) -> None:
    links: set[Link] = set(app[LINKS])
    await asyncio.gather(
        *(link.close(WSCloseCode.GOING_AWAY, "server shutting down") for link in links)
    )


def _static_file(root: Path, relative: str) -> Path:
    """``relative`` inside ``root`` (symlinks resolved), or 404: no way out of the folder, and
    no hidden files."""
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        raise web.HTTPNotFound() from None
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        raise web.HTTPNotFound()
    return path


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_static_file(request.app[STATIC_KEY], "index.html"))


async def static(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_static_file(request.app[STATIC_KEY], request.match_info["path"]))


async def healthz(request: web.Request) -> web.Response:
    """200 while new conversations would be taken, 503 (with the reason) while they would not:
    a load balancer sends callers elsewhere."""
    hub = request.app[HUB]
    server = request.app[SETTINGS].server
    refused = hub.refusal()
    body = {
        "ok": refused is None,
        "sessions": {"active": hub.metrics.sessions_active, "max": server.max_sessions},
        "loop_lag_ms": round(hub.metrics.loop_lag_ms, 1),
        "transcript_delay_ms": round(hub.metrics.transcript_delay_ms, 1),
    }
    if refused is not None:
        body["refused"] = {"code": refused.code, "message": str(refused)}
    return web.json_response(body, status=200 if refused is None else 503)


async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    text = hub.metrics.prometheus() + _process_metrics(hub.engine.prompt_cache_bytes)
    return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_TYPE})


def _process_metrics(prompt_cache_bytes: int) -> str:
    """What a leak would show: memory, threads (native ones too), descriptors, asyncio tasks;
    and the memory the models' prompt caches hold by design (bounded, llm.prompt_cache)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss_bytes = int(status["VmRSS"].split()[0]) * 1024
    gauges = {
        "process_resident_memory_bytes": rss_bytes,
        "process_threads": int(status["Threads"]),
        "process_open_fds": len(os.listdir("/proc/self/fd")),
        "relayvoice_asyncio_tasks": len(asyncio.all_tasks()),
        "relayvoice_prompt_cache_bytes": prompt_cache_bytes,
    }
    return "".join(f"# TYPE {name} gauge\n{name} {value}\n" for name, value in gauges.items())


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log without the query string, which may hold ``?token=``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.0f ms",
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
        )


async def serve(settings: Settings) -> None:
    """Load the models, serve on ``server.host``:``server.port`` until SIGINT or SIGTERM.

    Then, in order: admit no one (``/healthz`` says 503), give replies in progress
    ``server.shutdown_grace_s`` to finish and stop the rest, close every connection (each
    session's transcript is finished as it closes), and close the store and the engine."""
    check_exposure(settings.server)
    host, port = settings.server.host, settings.server.port
    store = TranscriptStore(settings.server.transcripts)
    if unfinished := store.mark_unfinished():
        log.warning("%d conversations were cut off when the server last stopped", unfinished)
    engine = Engine(settings)
    await engine.warm()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    hub = Hub(engine, store=store)
    hub.start()
    runner = web.AppRunner(create_app(hub, settings), access_log_class=AccessLogger)
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise SettingsError(f"cannot listen on {host}:{port}: {exc}") from None
        url = URL.build(scheme="http", host=host, port=port, path="/")
        print(f"relayvoice: serving on {url}", file=sys.stderr)
        print(f"relayvoice: transcripts in {store.path}", file=sys.stderr)
        await stop.wait()
        log.info("shutting down: finishing replies in progress")
        await hub.drain(settings.server.shutdown_grace_s)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        await hub.close()
        store.close()
        engine.close()
