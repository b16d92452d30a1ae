"""Who may use the server: a bearer token, the browser's origin, and where the server listens.

A voice server holds a microphone stream and spends CPU on every conversation, so:

- with ``server.token`` set, every route but the page, its static files and ``/healthz`` needs
  it: ``Authorization: Bearer <token>`` (the ``openai`` Python SDK sends that), ``?token=``
  (a browser's WebSocket cannot set headers), or the ``openai-insecure-api-key.<token>``
  WebSocket subprotocol (the OpenAI JavaScript SDK's browser form);
- a request carrying an ``Origin`` header (every browser WebSocket and cross-site fetch) must
  come from the server's own origin or one listed in ``server.allowed_origins``, so another
  site open in the user's browser cannot reach the microphone endpoints;
- without a token the server answers only requests addressed to a loopback name, which defeats
  DNS rebinding (a page on evil.example whose name now points at 127.0.0.1), and it refuses to
  listen anywhere but on loopback (``check_exposure``).
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from voice.settings import ServerSettings, SettingsError

PUBLIC_PATHS = ("/", "/healthz")
PUBLIC_PREFIX = "/static/"
SUBPROTOCOL_KEY = "openai-insecure-api-key."


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(authority: str) -> str:
    """The name in a Host header, without its port (read here: yarl refuses a bad port)."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


def check_exposure(server: ServerSettings) -> None:
    """Refuse to listen beyond this machine without a token: anyone on the network could
    otherwise talk to the models and read every conversation."""
    if not is_loopback(server.host) and not server.token:
        raise SettingsError(
            f"server.host {server.host!r} is reachable from other machines; set server.token "
            "(e.g. --set server.token=$(openssl rand -hex 16)) or listen on 127.0.0.1"
        )


def presented_token(request: web.Request) -> str | None:
    """The token the client sent, in whichever of the three accepted places."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if "token" in request.query:
        return request.query["token"]
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(SUBPROTOCOL_KEY):
            return protocol[len(SUBPROTOCOL_KEY) :]
    return None


def _refuse(status: int, code: str, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def refusal(request: web.Request, server: ServerSettings) -> web.Response | None:
    """Why ``request`` may not proceed (an error response), or None when it may."""
    if not server.token and not is_loopback(_hostname(request.host)):
        return _refuse(
            403, "forbidden_host", "without server.token only loopback names are answered"
        )
    origin = request.headers.get("Origin")
    if origin is not None:
        own = f"{request.scheme}://{request.host}".lower()
        listed = server.allowed_origins.split(",")
        allowed = {o.strip().rstrip("/").lower() for o in listed if o.strip()}
        if origin.rstrip("/").lower() not in allowed | {own}:
            return _refuse(
                403,
                "forbidden_origin",
                f"origin {origin!r} is not this server's; add it to server.allowed_origins",
            )
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIX)
    if server.token and not public:
        token = presented_token(request)
        if token is None:
            return _refuse(
                401,
                "unauthorized",
                "send the server token: Authorization: Bearer <token>, ?token=<token> or the "
                f"{SUBPROTOCOL_KEY}<token> websocket subprotocol",
            )
        if not hmac.compare_digest(token.encode(), server.token.encode()):
            return _refuse(401, "unauthorized", "wrong token")
    return None
