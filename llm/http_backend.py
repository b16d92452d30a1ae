"""A backend on an OpenAI-compatible streaming HTTP server (vLLM, llama.cpp's llama-server,
llama-cpp-python's server), for a model that has outgrown this machine.

Replies are greedy (temperature 0) and streamed as server-sent events; each token carries the
verifier's signals, estimated from the ``top_logprobs`` the server sends (see
:func:`top_logprob_signals`). A committed prefix is continued in one of two ways:

- chat (default): the prefix goes as a final assistant message with vLLM's
  ``continue_final_message``; llama-server continues a final assistant message by itself.
- completions (``chat_template`` given): the prompt is rendered here from the model's chat
  template, the prefix appended, and sent to ``/completions``. llama-cpp-python's server needs
  this: its chat endpoint ignores ``continue_final_message`` and opens a new assistant turn.

Every failure (refused connection, HTTP error, malformed stream, no bytes for ``timeout_s``)
raises :class:`BackendError` naming the URL; nothing waits longer than ``timeout_s`` for the
server's next bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llm.backend import BackendError, Message, Token
from voice.settings import LlmSettings, SettingsError

TOP_LOGPROBS = 10  # alternatives per token: most of the mass for a greedy reply's entropy
_BODY_SHOWN = 300  # characters of an error response quoted in the BackendError

# One scored token of a chunk: its text, its log-probability and the top alternatives'.
_Scored = tuple[str, float, list[float]]


def top_logprob_signals(logprob: float, top: Sequence[float]) -> tuple[float, float, float]:
    """(log-probability, entropy, top-1/top-2 margin) from the chosen token's log-probability
    and the top-k log-probabilities a server reports.

    The entropy is estimated: the top-k tokens' terms (renormalised should they sum past 1 by
    rounding), plus the mass r they leave taken as one more outcome. As that rest is really
    spread over tokens each no likelier than the k-th (p_k), it adds at least
    -r log min(r, p_k), which is what is counted: a lower bound of the exact entropy, tight
    when the top-k hold nearly all the mass. Measured with k = 10 against the exact values
    (teacher-forced, same GGUF): a median 0.95-0.98 of them on Qwen2.5-1.5B's replies, 0.8 on
    the far less certain SmolLM2-135M's. The margin is nan when the server gave fewer than two
    alternatives."""
    ranked = sorted(top if logprob in top else [*top, logprob], reverse=True)
    probs = [math.exp(x) for x in ranked]
    total = sum(probs)
    if total > 1.0:
        probs = [p / total for p in probs]
    rest = max(0.0, 1.0 - sum(probs))
    entropy = -sum(p * math.log(p) for p in probs if p > 0.0)
    if rest > 0.0:
        entropy -= rest * math.log(min(rest, math.exp(min(top, default=0.0))))
    margin = ranked[0] - ranked[1] if len(ranked) > 1 else math.nan
    return logprob, entropy, margin


def _chat_choice(choice: dict[str, Any]) -> tuple[str, list[_Scored]]:
    text = (choice.get("delta") or {}).get("content") or ""
    scored = (choice.get("logprobs") or {}).get("content") or []
    return text, [
        (s["token"], s["logprob"], [t["logprob"] for t in s.get("top_logprobs") or []])
        for s in scored
    ]


def _completion_choice(choice: dict[str, Any]) -> tuple[str, list[_Scored]]:
    """A legacy ``/completions`` choice: parallel lists, top-k as {token text: logprob}."""
    logprobs = choice.get("logprobs") or {}
    texts = logprobs.get("tokens") or []
    tops = [list((top or {}).values()) for top in logprobs.get("top_logprobs") or []]
    scored = zip(texts, logprobs.get("token_logprobs") or [], tops, strict=True)
    return choice.get("text") or "", list(scored)


def _tokens(text: str, scored: list[_Scored]) -> list[Token]:
    """One Token per token the server scored when their texts make up the chunk's; otherwise
    one Token for the whole chunk (signals of its first token, nan when the server sent none)."""
    if scored and "".join(s[0] for s in scored) == text:
        return [Token(t, *top_logprob_signals(lp, top)) for t, lp, top in scored]
    if not text:
        return []
    signals = top_logprob_signals(*scored[0][1:]) if scored else (math.nan,) * 3
    return [Token(text, *signals)]


class HttpBackend:
    """The :class:`llm.backend.Backend` interface over HTTP, one request per reply."""

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        chat_template: str | None = None,
    ) -> None:
        self.name = name
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._formatter = (
            Jinja2ChatFormatter(chat_template, eos_token="", bos_token="")
            if chat_template
            else None
        )
        self._ssl = httpx2.create_ssl_context()  # ~25 ms: once, not per event loop
        self._pool: tuple[asyncio.AbstractEventLoop, httpx2.AsyncClient] | None = None

    @classmethod
    def from_settings(cls, name: str, settings: LlmSettings) -> HttpBackend:
        template = None
        if settings.http_chat_template:
            path = Path(settings.http_chat_template).expanduser()
            try:
                template = path.read_text()
            except OSError as exc:
                raise SettingsError(f"llm.http_chat_template: cannot read {path}: {exc}") from None
        return cls(
            name,
            settings.http_base_url,
            settings.http_model,
            settings.http_api_key or None,
            settings.http_timeout_s,
            template,
        )

    def _client(self) -> httpx2.AsyncClient:
        """The running event loop's connection pool (kept-alive connections belong to the loop
        that opened them, so another loop, as in tests, gets a pool of its own)."""
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool[0] is not loop:
            client = httpx2.AsyncClient(
                headers=self._headers, timeout=self._timeout_s, verify=self._ssl
            )
            self._pool = (loop, client)
        return self._pool[1]

    def _request(
        self, messages: Sequence[Message], assistant_prefix: str, max_tokens: int, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        """(URL, JSON body) of a greedy reply to ``messages`` continuing ``assistant_prefix``."""
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
        if self._model:
            body["model"] = self._model
        chat = [{"role": m.role, "content": m.content} for m in messages]
        if self._formatter is not None:
            body["prompt"] = self._formatter(messages=chat).prompt + assistant_prefix
            if stream:
                body["logprobs"] = TOP_LOGPROBS
            return f"{self._base_url}/completions", body
        if assistant_prefix:
            chat.append({"role": "assistant", "content": assistant_prefix})
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if stream:
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return f"{self._base_url}/chat/completions", body | {"messages": chat}

    async def prefill(self, messages: Sequence[Message], assistant_prefix: str = "") -> None:
        """Ask for one token of the reply. The server evaluates the prompt and keeps it cached,
        so the real request reads only what follows: llama-cpp-python's server reuses its
        context's longest common prefix, llama-server does so with ``cache_prompt`` (its
        default) and vLLM with prefix caching; a server without a prompt cache gains nothing."""
        url, body = self._request(messages, assistant_prefix, 1, stream=False)
        try:
            await self._check(await self._client().post(url, json=body), url)
        except httpx2.HTTPError as exc:
            raise self._failure(exc, url) from exc

    async def stream(
        self, messages: Sequence[Message], assistant_prefix: str = "", max_tokens: int = 64
    ) -> AsyncIterator[Token]:
        """The reply's tokens as they arrive. Closing the iterator closes the connection; the
        servers stop generating when they next find the client gone (llama-cpp-python's after
        the next token)."""
        url, body = self._request(messages, assistant_prefix, max_tokens, stream=True)
        try:
            async with self._client().sse(url, method="POST", json=body) as events:
                await self._check(events.response, url)
                async for event in events:
                    if event.data == "[DONE]":
                        return
                    for token in self._parse(event.data, url):
                        yield token
        except httpx2.HTTPError as exc:
            raise self._failure(exc, url) from exc
        raise BackendError(f"{self.name}: the stream from {url} ended without [DONE]")

    def _parse(self, data: str, url: str) -> list[Token]:
        """The tokens of one streamed chunk (none for a chunk without a choice, such as usage)."""
        parse = _chat_choice if self._formatter is None else _completion_choice
        try:
            chunk = json.loads(data)
            if error := chunk.get("error"):
                raise BackendError(f"{self.name}: {url} failed mid-stream: {error}")
            choices = chunk.get("choices")
            return _tokens(*parse(choices[0])) if choices else []
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise BackendError(f"{self.name}: malformed event from {url}: {data[:80]!r}") from exc

    async def _check(self, response: httpx2.Response, url: str) -> None:
        if not response.is_success:
            text = (await response.aread()).decode(errors="replace")[:_BODY_SHOWN]
            raise BackendError(f"{self.name}: {url} answered HTTP {response.status_code}: {text}")

    def _failure(self, exc: httpx2.HTTPError, url: str) -> BackendError:
        if isinstance(exc, httpx2.TimeoutException):
            reason = f"no answer within {self._timeout_s:g} s ({type(exc).__name__})"
        elif isinstance(exc, httpx2.ConnectError):
            reason = f"cannot connect ({exc})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return BackendError(f"{self.name}: {url}: {reason}")

    def close(self) -> None:
        """Let go of the connection pool. Idle sockets close as it is collected: its event loop
        may have ended already, so it cannot be awaited here."""
        self._pool = None
