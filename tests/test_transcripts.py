import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from voice.cli import main
from voice.session import TurnRecord
from voice.transcripts import (
    UNFINISHED,
    TranscriptStore,
    TranscriptStoreError,
    UnknownSession,
)

ROOT = Path(__file__).resolve().parents[1]


def _turns() -> list[TurnRecord]:
    first = TurnRecord(
        turn_id=1,
        mode="relay",
        user_text="what's the weather like",
        speech_ended_at=10.0,
        turn_ended_at=10.25,
        turn_reason="silence",
        first_audio_out_at=10.4123,
        finished_at=12.0,
        reply_text="It is sunny and warm today.",
        heard_text="It is sunny and warm today.",
        verdict="accepted",
        prefix_text="It is",
    )
    second = TurnRecord(
        turn_id=2,
        mode="relay",
        user_text="tell me a long story",
        speech_ended_at=20.0,
        turn_ended_at=20.3,
        reply_text="Once upon a time there was a dragon who lived in a cave.",
        heard_text="Once upon a time",
        speech_over_at=21.0,
        stopped_at=21.1,
        interruption="barge-in",
        false_interruptions=1,
        errors=["tts: slow"],
    )
    return [first, second]


@pytest.fixture
def store(tmp_path):
    store = TranscriptStore(tmp_path / "sub" / "t.sqlite3")
    yield store
    store.close()


def test_round_trip_two_turns_with_an_interruption(store):
    store.open_session("abcd1234", "ws", "relay", started_at=1000.0)
    for record in _turns():
        store.add_turn("abcd1234", record)
    store.end_session("abcd1234", "client closed", ended_at=1060.0)

    data = store.export("abcd1234")
    assert data["session"] == {
        "id": "abcd1234",
        "started_at": 1000.0,
        "ended_at": 1060.0,
        "transport": "ws",
        "mode": "relay",
        "end_reason": "client closed",
        "turns": 2,
    }
    first, second = data["turns"]
    assert [first["turn_id"], second["turn_id"]] == [1, 2]
    assert first["timings"]["turn_ended_ms"] == 250.0
    assert first["timings"]["first_audio_out_ms"] == 412.3
    assert first["timings"]["stopped_ms"] is None
    assert "speech_ended_ms" not in first["timings"]
    assert first["timings"]["verdict"] == "accepted"
    assert first["timings"]["prefix_text"] == "It is"
    assert first["errors"] == []
    assert second["interruption"] == "barge-in"
    assert second["heard_text"] == "Once upon a time"
    assert second["reply_text"].endswith("in a cave.")
    assert second["timings"]["stopped_ms"] == 1100.0
    assert second["timings"]["false_interruptions"] == 1
    assert second["errors"] == ["tts: slow"]
    assert second["at"] >= first["at"] > 0

    # A turn written again replaces the earlier row.
    store.add_turn("abcd1234", TurnRecord(turn_id=2, mode="fast", heard_text="Once"))
    assert store.export("abcd1234")["turns"][1]["heard_text"] == "Once"
    assert store.sessions()[0].turns == 2


def test_wal_mode_and_schema_version(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()


def test_sessions_newest_first_with_limit(store):
    for i, started in enumerate([300.0, 100.0, 200.0]):
        store.open_session(f"session-{i}", "webrtc", "fast", started_at=started)
    store.add_turn("session-1", _turns()[0])
    assert [s.id for s in store.sessions()] == ["session-0", "session-2", "session-1"]
    assert [s.turns for s in store.sessions()] == [0, 0, 1]
    assert [s.id for s in store.sessions(limit=1)] == ["session-0"]


def test_turns_survive_sigkill(tmp_path):
    path = tmp_path / "t.sqlite3"
    script = textwrap.dedent(
        f"""
        import time
        from voice.session import TurnRecord
        from voice.transcripts import TranscriptStore

        store = TranscriptStore({str(path)!r})
        store.open_session("killed-session", "ws", "relay")
        for i in range(1, 4):
            record = TurnRecord(turn_id=i, mode="relay", user_text=f"u{{i}}")
            store.add_turn("killed-session", record)
        print("written", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    store = TranscriptStore(path)
    try:
        data = store.export("killed-session")
        assert [t["user_text"] for t in data["turns"]] == ["u1", "u2", "u3"]
        assert data["session"]["ended_at"] is None
    finally:
        store.close()


def test_mark_unfinished(store):
    store.open_session("with-turns", "ws", "relay", started_at=100.0)
    store.add_turn("with-turns", _turns()[0])
    store.open_session("no-turns", "ws", "relay", started_at=200.0)
    store.open_session("ended", "ws", "relay", started_at=300.0)
    store.end_session("ended", "client closed", ended_at=310.0)
    store.open_session("started-later", "ws", "relay", started_at=5000.0)

    assert store.mark_unfinished(now=1000.0) == 2
    by_id = {s.id: s for s in store.sessions()}
    last_turn_at = store.export("with-turns")["turns"][0]["at"]
    assert (by_id["with-turns"].ended_at, by_id["with-turns"].end_reason) == (
        last_turn_at,
        UNFINISHED,
    )
    assert (by_id["no-turns"].ended_at, by_id["no-turns"].end_reason) == (200.0, UNFINISHED)
    assert (by_id["ended"].ended_at, by_id["ended"].end_reason) == (310.0, "client closed")
    assert by_id["started-later"].ended_at is None
    assert store.mark_unfinished(now=1000.0) == 0


def test_prefix_lookup(store):
    store.open_session("abcd1111", "ws", "relay")
    store.open_session("abcd2222", "ws", "relay")
    assert store.export("abcd1")["session"]["id"] == "abcd1111"
    assert store.export("abcd2222")["session"]["id"] == "abcd2222"
    with pytest.raises(TranscriptStoreError, match=r"ambiguous.*abcd1111, abcd2222"):
        store.export("abcd")
    with pytest.raises(UnknownSession, match="no session abc in"):
        store.export("abc")  # shorter than 4: exact ids only
    with pytest.raises(KeyError):
        store.export("zzzz")


def test_not_a_database_names_the_path_and_setting(tmp_path):
    path = tmp_path / "t.sqlite3"
    path.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(TranscriptStoreError) as caught:
        TranscriptStore(path)
    assert str(path) in str(caught.value)
    assert "server.transcripts" in str(caught.value)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.sqlite3"
    TranscriptStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=2")
    db.close()
    with pytest.raises(TranscriptStoreError, match="version 2, newer"):
        TranscriptStore(path)


def test_cli_list_and_export(tmp_path, capsys):
    path = tmp_path / "t.sqlite3"
    store = TranscriptStore(path)
    store.open_session("abcd1234", "webrtc", "relay", started_at=1_700_000_000.0)
    for record in _turns():
        store.add_turn("abcd1234", record)
    store.end_session("abcd1234", "client closed", ended_at=1_700_000_075.0)
    store.close()
    where = ["--set", f"server.transcripts={path}"]

    assert main([*where, "sessions", "list"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["id", "started", "duration"]
    assert row.split()[0] == "abcd1234"
    assert row.split()[2:6] == ["1m15s", "2", "webrtc", "relay"]
    assert row.endswith("client closed")

    assert main([*where, "sessions", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["turns"] == 2

    assert main([*where, "sessions", "export", "abcd"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"][1]["interruption"] == "barge-in"

    assert main([*where, "sessions", "export", "abcd1234", "--format", "text"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "user: what's the weather like",
        "assistant: It is sunny and warm today.",
        "user: tell me a long story",
        "assistant: Once upon a time [interrupted: barge-in]",
        "[error: tts: slow]",
        "[ended: client closed]",
    ]

    assert main([*where, "sessions", "export", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"relayvoice: error: no session nope in {path}"


def test_cli_without_a_database(tmp_path, capsys):
    path = tmp_path / "none" / "t.sqlite3"
    where = ["--set", f"server.transcripts={path}"]
    assert main([*where, "sessions", "list"]) == 0
    message = f"no transcripts yet at {path} (server.transcripts)"
    assert capsys.readouterr().err.strip() == message
    assert main([*where, "sessions", "export", "abcd"]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not path.exists()
