"""What every transport shares: admission of new conversations, and the server's metrics.

Transports (WebRTC, the OpenAI-Realtime websocket, the raw PCM websocket) never build a
pipeline themselves: they ask the hub for a ``Session`` and feed it audio. The hub refuses a
conversation beyond ``server.max_sessions`` at once (``SessionLimitReached``), closes every
session it handed out, and counts what ``/metrics`` reports.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from voice.clock import Clock, RealClock
from voice.engine import Engine
from voice.events import Event, StageError
from voice.session import Observer, Session, TurnRecord
from voice.settings import RelayMode

ONSET_BUCKETS_MS = (100, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000)


class SessionLimitReached(RuntimeError):
    """The server is at ``server.max_sessions``; the client should retry later."""

    code = "session_limit_reached"


class Metrics:
    """Counters and the onset histogram, in the Prometheus text format."""

    def __init__(self) -> None:
        self.sessions_active = 0
        self.sessions_total = 0
        self.sessions_refused = 0
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
            "# HELP relayvoice_sessions_refused_total Conversations refused at the limit.",
            "# TYPE relayvoice_sessions_refused_total counter",
            f"relayvoice_sessions_refused_total {self.sessions_refused}",
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
    def __init__(self, engine: Engine, clock: Clock | None = None) -> None:
        self.engine = engine
        self.clock = clock or RealClock()
        self.metrics = Metrics()
        self._active: set[Session] = set()

    @property
    def full(self) -> bool:
        return len(self._active) >= self.engine.settings.server.max_sessions

    @asynccontextmanager
    async def session(
        self,
        input_rate: int,
        output_rate: int,
        mode: RelayMode | None = None,
        observer: Observer | None = None,
    ) -> AsyncIterator[Session]:
        """A new conversation, closed (its tasks ended) when the block exits, however it
        exits. Raises ``SessionLimitReached`` at once when the server is full."""
        if self.full:
            self.metrics.sessions_refused += 1
            raise SessionLimitReached(
                f"{len(self._active)} conversations in progress, the most this server takes "
                f"(server.max_sessions); try again later"
            )
        session = self.engine.session(
            self.clock,
            input_rate=input_rate,
            output_rate=output_rate,
            mode=mode,
            observer=self._observe(observer),
            on_record=self.metrics.record,
        )
        self._active.add(session)
        self.metrics.sessions_total += 1
        self.metrics.sessions_active = len(self._active)
        try:
            yield session
        finally:
            self._active.discard(session)
            self.metrics.sessions_active = len(self._active)
            await session.close()

    def _observe(self, observer: Observer | None) -> Callable[[Event], None]:
        def observe(event: Event) -> None:
            if isinstance(event, StageError):
                self.metrics.errors[event.stage] += 1
            if observer is not None:
                observer(event)

        return observe
