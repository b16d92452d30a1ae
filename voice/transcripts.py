"""Every conversation's turns, written to SQLite as they happen (`relayvoice sessions`).

Why SQLite in WAL mode with ``synchronous=NORMAL``: each write below is its own committed
transaction, appended to the write-ahead log at once, so a turn survives the server process
being killed (even SIGKILL) the moment the call returns. Only an operating-system crash or a
power cut can lose the last few transactions (NORMAL does not fsync on every commit); the
database itself stays consistent either way. Readers (the CLI) never block the writer.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time the record's fields are read off the instance: a light import
    from voice.session import TurnRecord

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
    transport TEXT NOT NULL,
    mode TEXT NOT NULL,
    end_reason TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    turn_id INTEGER NOT NULL,
    at REAL NOT NULL,
    mode TEXT NOT NULL,
    user_text TEXT NOT NULL,
    reply_text TEXT NOT NULL,
    heard_text TEXT NOT NULL,
    interruption TEXT NOT NULL,
    timings TEXT NOT NULL,
    errors TEXT NOT NULL,
    PRIMARY KEY (session_id, turn_id)
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions (started_at);
"""
UNFINISHED = "server stopped unexpectedly"
MIN_PREFIX = 4
_SUMMARY = """SELECT s.id, s.started_at, s.ended_at, s.transport, s.mode, s.end_reason,
    (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id) FROM sessions s"""


class TranscriptStoreError(Exception):
    """The transcript database cannot be used, or does not hold what was asked for."""


class UnknownSession(TranscriptStoreError, KeyError):
    """No session has that id (or id prefix)."""

    __str__ = Exception.__str__  # KeyError would print the message quoted


@dataclasses.dataclass(frozen=True)
class SessionSummary:
    """One conversation, as `relayvoice sessions list` shows it."""

    id: str
    started_at: float  # unix time
    ended_at: float | None
    transport: str
    mode: str
    end_reason: str | None
    turns: int


def timings_of(record: TurnRecord) -> dict[str, Any]:
    """The record's instants as ms after the end of the user's speech (clock values mean
    nothing outside the process), plus the turn's other measurements."""
    timings: dict[str, Any] = dict(record.timeline_ms())
    timings.update(
        gap_ms=record.gap_ms,
        turn_reason=record.turn_reason,
        verdict=record.verdict,
        prefix_text=record.prefix_text,
        false_interruptions=record.false_interruptions,
    )
    return timings


class TranscriptStore:
    """The transcript database; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit: every statement below commits on its own, nothing is buffered.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise TranscriptStoreError(
                    f"{self.path} has transcript schema version {version}, newer than this "
                    f"relayvoice understands ({SCHEMA_VERSION}); upgrade relayvoice or point "
                    "server.transcripts elsewhere"
                )
            if version < SCHEMA_VERSION:
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise TranscriptStoreError(
                f"{self.path} is not a usable transcript database ({exc}); "
                "fix or move it, or set server.transcripts to another file"
            ) from exc
        except TranscriptStoreError:
            self._db.close()
            raise

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._lock:
            try:
                return self._db.execute(sql, params).rowcount
            except sqlite3.IntegrityError as exc:
                raise TranscriptStoreError(f"{self.path}: {exc} ({params[0]})") from exc

    def open_session(
        self, session_id: str, transport: str, mode: str, started_at: float | None = None
    ) -> None:
        """Record a new conversation (its id must be new)."""
        started = time.time() if started_at is None else started_at
        self._write(
            "INSERT INTO sessions (id, started_at, transport, mode) VALUES (?, ?, ?, ?)",
            (session_id, started, transport, mode),
        )

    def add_turn(self, session_id: str, record: TurnRecord) -> None:
        """Write one reply now (the same turn written again replaces the earlier row)."""
        self._write(
            "INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                record.turn_id,
                time.time(),
                record.mode,
                record.user_text,
                record.reply_text,
                record.heard_text,
                record.interruption,
                json.dumps(timings_of(record)),
                json.dumps(list(record.errors)),
            ),
        )

    def end_session(self, session_id: str, reason: str, ended_at: float | None = None) -> None:
        """Record how and when a conversation ended."""
        ended = time.time() if ended_at is None else ended_at
        self._write(
            "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ?",
            (ended, reason, session_id),
        )

    def mark_unfinished(self, now: float | None = None) -> int:
        """Close the sessions a killed server left open (those started before ``now``): they
        end at their last turn, or at their start when they have none. Returns how many."""
        cutoff = time.time() if now is None else now
        return self._write(
            """UPDATE sessions SET end_reason = ?, ended_at = COALESCE(
                (SELECT MAX(at) FROM turns WHERE session_id = sessions.id), started_at)
            WHERE ended_at IS NULL AND started_at <= ?""",
            (UNFINISHED, cutoff),
        )

    def sessions(self, limit: int = 50) -> list[SessionSummary]:
        """The latest conversations, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"{_SUMMARY} ORDER BY s.started_at DESC, s.rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [SessionSummary(*row) for row in rows]

    def export(self, session_id: str) -> dict[str, Any]:
        """One conversation and all its turns; ``session_id`` may be a unique prefix (>= 4)."""
        with self._lock:
            summary = self._summary(session_id)
            rows = self._db.execute(
                "SELECT turn_id, at, mode, user_text, reply_text, heard_text, interruption,"
                " timings, errors FROM turns WHERE session_id = ? ORDER BY turn_id",
                (summary.id,),
            ).fetchall()
        keys = ("turn_id", "at", "mode", "user_text", "reply_text", "heard_text", "interruption")
        turns = []
        for *row, timings, errors in rows:
            turn = dict(zip(keys, row, strict=True))
            turns.append({**turn, "timings": json.loads(timings), "errors": json.loads(errors)})
        return {"session": dataclasses.asdict(summary), "turns": turns}

    def _summary(self, session_id: str) -> SessionSummary:
        row = self._db.execute(f"{_SUMMARY} WHERE s.id = ?", (session_id,)).fetchone()
        if row is None and len(session_id) >= MIN_PREFIX:
            rows = self._db.execute(
                f"{_SUMMARY} WHERE substr(s.id, 1, ?) = ? ORDER BY s.id LIMIT 6",
                (len(session_id), session_id),
            ).fetchall()
            if len(rows) > 1:
                some = ", ".join(r[0] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
                raise TranscriptStoreError(
                    f"session prefix {session_id} is ambiguous in {self.path}: {some}"
                )
            row = rows[0] if rows else None
        if row is None:
            raise UnknownSession(f"no session {session_id} in {self.path}")
        return SessionSummary(*row)

    def close(self) -> None:
        """Close the connection (every write is already committed)."""
        with self._lock:
            self._db.close()
