"""What every transport shares: admission of new conversations, their transcripts, the
server's metrics and its orderly shutdown.

Transports (WebRTC, the OpenAI-Realtime websocket, the raw PCM websocket) never build a
pipeline themselves: they ask the hub for a ``Session`` and feed it audio. Every session shares
the engine's models. The hub admits a conversation only while the ones it has keep real time,
and refuses one at once otherwise (``Refused``, with a code): at ``server.max_sessions``
(the capacity ``relayvoice eval load`` measured), while recognition lags behind speech
(``server.admit_transcript_delay_ms``) or the event loop is late (``server.admit_loop_lag_ms``),
and while shutting down. Each finished reply is written to the transcript store at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import statistics
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from voice.clock import Clock, RealClock
from voice.engine import Engine
from voice.events import Event, SessionFailed, StageError
from voice.session import Observer, Session, TurnRecord
from voice.settings import RelayMode
from voice.transcripts import TranscriptStore

ONSET_BUCKETS_MS = (100, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000)
LAG_PROBE_S = 0.1  # how often the event loop's lateness is sampled
LAG_WINDOW = 20  # samples kept: the worst of the last 2 s counts
DRAIN_POLL_S = 0.05

log = logging.getLogger(__name__)


class Refused(RuntimeError):
    """A new conversation cannot be taken now; the client should retry later."""

    code = "refused"


class SessionLimitReached(Refused):
    """The server is at ``server.max_sessions``."""

    code = "session_limit_reached"


class Overloaded(Refused):
    """The conversations in progress are not keeping real time."""

    code = "server_overloaded"


class ShuttingDown(Refused):
    code = "server_shutting_down"


class Metrics:
    """Counters and the onset histogram, in the Prometheus text format."""

    def __init__(self) -> None:
        self.sessions_active = 0
        self.sessions_total = 0
        self.sessions_refused = Counter[str]()  # by code
        self.loop_lag_ms = 0.0
        self.transcript_delay_ms = 0.0
        self.turns_total = 0
        self.interruptions_total = 0
        self.errors = Counter[str]()  # by stage
        self._onset_buckets = [0] * (len(ONSET_BUCKETS_MS) + 1)  # the last one is +Inf
        self._onset_sum_ms = 0.0

    def record(self, record: TurnRecord) -> None:
        self.turns_total += 1
        self.interruptions_total += bool(record.interruption)
        if record.first_audio_out_at is not None and record.speech_ended_at is not None:
            onset = (record.first_audio_out_at - record.speech_ended_at) * 1000
            self._onset_buckets[bisect.bisect_left(ONSET_BUCKETS_MS, onset)] += 1
            self._onset_sum_ms += onset

    def prometheus(self) -> str:
        lines = [
            "# HELP relayvoice_sessions_active Conversations in progress.",
            "# TYPE relayvoice_sessions_active gauge",
            f"relayvoice_sessions_active {self.sessions_active}",
            "# HELP relayvoice_sessions_total Conversations admitted.",
            "# TYPE relayvoice_sessions_total counter",
            f"relayvoice_sessions_total {self.sessions_total}",
            "# HELP relayvoice_sessions_refused_total Conversations refused, by reason.",
            "# TYPE relayvoice_sessions_refused_total counter",
            *(
                f'relayvoice_sessions_refused_total{{code="{c}"}} {n}'
                for c, n in sorted(self.sessions_refused.items())
            ),
            "# HELP relayvoice_loop_lag_ms The event loop's worst lateness in the last 2 s.",
            "# TYPE relayvoice_loop_lag_ms gauge",
            f"relayvoice_loop_lag_ms {self.loop_lag_ms:.1f}",
            "# HELP relayvoice_transcript_delay_ms The slowest conversation's median delay from "
            "the end of speech to its final transcript.",
            "# TYPE relayvoice_transcript_delay_ms gauge",
            f"relayvoice_transcript_delay_ms {self.transcript_delay_ms:.1f}",
            "# HELP relayvoice_turns_total Replies whose audio ended (played or interrupted).",
            "# TYPE relayvoice_turns_total counter",
            f"relayvoice_turns_total {self.turns_total}",
            "# HELP relayvoice_interruptions_total Replies the user cut off.",
            "# TYPE relayvoice_interruptions_total counter",
            f"relayvoice_interruptions_total {self.interruptions_total}",
            "# HELP relayvoice_errors_total Stage errors, by stage.",
            "# TYPE relayvoice_errors_total counter",
            *(
                f'relayvoice_errors_total{{stage="{s}"}} {n}'
                for s, n in sorted(self.errors.items())
            ),
            "# HELP relayvoice_onset_ms From the VAD's end of the user's speech to the reply's "
            "first sample sent.",
            "# TYPE relayvoice_onset_ms histogram",
        ]
        total = 0
        for bound, count in zip([*ONSET_BUCKETS_MS, "+Inf"], self._onset_buckets, strict=True):
            total += count
            lines.append(f'relayvoice_onset_ms_bucket{{le="{bound}"}} {total}')
        lines += [
            f"relayvoice_onset_ms_sum {self._onset_sum_ms:.1f}",
            f"relayvoice_onset_ms_count {total}",
        ]
        return "\n".join(lines) + "\n"


class Hub:
    def __init__(
        self, engine: Engine, clock: Clock | None = None, store: TranscriptStore | None = None
    ) -> None:
        self.engine = engine
        self.clock = clock or RealClock()
        self.store = store  # None: transcripts are not kept (tests)
        self.metrics = Metrics()
        self.draining = False
        self._active: set[Session] = set()
        self._lags: deque[float] = deque(maxlen=LAG_WINDOW)
        self._lag_probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin measuring the event loop's lateness (admission control reads it)."""
        self._lag_probe = asyncio.create_task(self._probe_loop_lag())

    async def _probe_loop_lag(self) -> None:
        while True:
            before = self.clock.now()
            await self.clock.sleep(LAG_PROBE_S)
            self._lags.append(max(0.0, self.clock.now() - before - LAG_PROBE_S))

    @property
    def loop_lag_ms(self) -> float:
        return max(self._lags, default=0.0) * 1000

    @property
    def transcript_delay_ms(self) -> float:
        """The slowest conversation's median delay from end of speech to final transcript."""
        sessions = [s.transcript_delays for s in self._active if s.transcript_delays]
        delays = [statistics.median(recent) for recent in sessions]
        return max(delays, default=0.0) * 1000

    def refusal(self) -> Refused | None:
        """Why a new conversation would be refused now, or None when it would be taken."""
        server = self.engine.settings.server
        self.metrics.loop_lag_ms = lag = self.loop_lag_ms
        self.metrics.transcript_delay_ms = delay = self.transcript_delay_ms
        if self.draining:
            return ShuttingDown("the server is shutting down; try another or later")
        if len(self._active) >= server.max_sessions:
            return SessionLimitReached(
                f"{len(self._active)} conversations in progress, the most this server takes "
                f"(server.max_sessions); try again later"
            )
        if delay > server.admit_transcript_delay_ms:
            return Overloaded(
                f"speech recognition is {delay:.0f} ms behind with {len(self._active)} "
                f"conversations (server.admit_transcript_delay_ms); try again later"
            )
        if lag > server.admit_loop_lag_ms:
            return Overloaded(
                f"the server is {lag:.0f} ms late on its work (server.admit_loop_lag_ms); "
                "try again later"
            )
        return None

    @asynccontextmanager
    async def session(
        self,
        input_rate: int,
        output_rate: int,
        mode: RelayMode | None = None,
        observer: Observer | None = None,
        transport: str = "",
    ) -> AsyncIterator[Session]:
        """A new conversation, closed (its tasks ended, its transcript finished) when the block
        exits, however it exits. Raises ``Refused`` at once when it cannot be taken."""
        if (refused := self.refusal()) is not None:
            self.metrics.sessions_refused[refused.code] += 1
            raise refused

        def on_record(record: TurnRecord) -> None:  # called only once ``session`` exists
            self.metrics.record(record)
            self._write(lambda store: store.add_turn(session.id, record))

        session = self.engine.session(
            self.clock,
            input_rate=input_rate,
            output_rate=output_rate,
            mode=mode,
            observer=self._observe(observer),
            on_record=on_record,
        )
        self._write(lambda store: store.open_session(session.id, transport, session.mode))
        self._active.add(session)
        self.metrics.sessions_total += 1
        self.metrics.sessions_active = len(self._active)
        reason = "conversation ended"
        try:
            yield session
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._active.discard(session)
            self.metrics.sessions_active = len(self._active)
            await session.close()  # a reply still playing is written as it stopped
            if session.failure is not None:
                reason = session.failure
            elif self.draining:
                reason = "the server shut down"
            self._write(lambda store: store.end_session(session.id, reason))

    def _write(self, write: Callable[[TranscriptStore], None]) -> None:
        """A transcript write; one that fails (disk full) is logged, the conversation goes on."""
        if self.store is None:
            return
        try:
            write(self.store)
        except Exception:
            log.exception("could not write the transcript")
            self.metrics.errors["transcripts"] += 1

    async def drain(self, grace_s: float) -> None:
        """Shutting down: admit no one, give replies in progress ``grace_s`` to finish, then
        stop the rest (their transcripts keep what was heard)."""
        self.draining = True
        deadline = self.clock.now() + grace_s
        while any(s.busy for s in self._active) and self.clock.now() < deadline:
            await self.clock.sleep(DRAIN_POLL_S)
        for session in self._active:
            if session.busy:
                session.interrupt("shutdown")

    async def close(self) -> None:
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_probe

    def _observe(self, observer: Observer | None) -> Callable[[Event], None]:
        def observe(event: Event) -> None:
            if isinstance(event, StageError):
                self.metrics.errors[event.stage] += 1
            if isinstance(event, SessionFailed):
                self.metrics.errors["session"] += 1
            if observer is not None:
                observer(event)

        return observe
