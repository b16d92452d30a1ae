"""`relayvoice eval load`: many conversations at once against one `relayvoice serve`.

This process is the load generator: it starts the server in a process of its own on a loopback
port (``eval/transport.py``), and opens N concurrent ``/v1/pcm`` conversations that speak the
latency dialogues' real recorded turns in real time, each reply heard to its end before the
next turn (one turn at a time, so every level is bounded in time; clients start at staggered
moments, as independent callers do). Levels N = 1, 2, 4, 8 and on, doubling while the server
keeps real time. Everything stops by itself.

Per level: the reply onset at the client (true end of speech sent → first reply sound heard),
and whether the server kept real time:

- no underruns: no reply fell silent once it had begun because its audio was not ready
  (``gap_ms`` ≥ ``UNDERRUN_MS``, measured at the server's playout), and no reply audio reached
  the client late (two frames of a reply more than ``STALL_MS`` apart on arrival);
- recognition keeping up: the turn's final transcript at most ``ASR_LAG_MS`` after the turn
  ended (P90);
- no error events and no refused or failed connections.

The server runs with admission control off (``server.max_sessions`` above the largest level,
thresholds at infinity), so that the benchmark sees where real time breaks; the capacity it
finds is ``server.max_sessions``' default.

Then the faults, each against a fresh server:

- soak: 4 conversations for 30 minutes (``--quick``: 2), the server's RSS, threads, file
  descriptors and asyncio tasks before and after (``/metrics``);
- abrupt disconnects mid-turn and mid-reply, then a fresh conversation must still be answered;
- SIGKILL mid-conversation: every turn a client saw finish must be in the SQLite transcripts;
  the export command reads them back;
- a failing slow backend (an HTTP backend nobody listens for): each reply fails with an error
  event (and an apology when nothing was said), the third closes the session with the reason,
  and the server goes on taking conversations;
- SIGTERM mid-reply: the server exits 0 within ``server.shutdown_grace_s`` (plus closing) and
  the conversation's transcript ends "the server shut down".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from asr.stage import AsrModels
from eval.latency import Dialogue, TurnResult, UserTurn, dialogues, settle_seconds, until
from eval.report import progress, publish
from eval.transport import (
    HOST,
    Client,
    PcmClient,
    Server,
    ServerFailed,
    free_port,
    pcm_client,
    run_dialogue,
    serve,
)
from voice.settings import Settings
from voice.transcripts import TranscriptStore

LEVELS = (1, 2, 4, 8)
MAX_LEVEL = 16
LEVEL_S = {True: 60.0, False: 180.0}  # --quick: each level this long (turns then finish)
SOAK_SESSIONS = 4
SOAK_S = {True: 120.0, False: 1800.0}
SOAK_WARM_SHARE = 0.25
STAGGER_S = 3.0  # clients start at random moments within this
UNDERRUN_MS = 100.0
STALL_MS = 120.0
ASR_LAG_MS = 1000.0
SETTLE_AFTER_S = 3.0
KILL_WITHIN_S = 300.0  # after the clients leave, before the server's resources are read
MIB = 1024 * 1024

Json = dict[str, object]


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


@dataclass
class Conversation:
    """One client's run: its turns and what it saw go wrong."""

    results: list[TurnResult] = field(default_factory=list)
    stalls: int = 0
    errors: list[str] = field(default_factory=list)


def stalls(client: Client) -> int:
    """Replies whose frames reached the client more than ``STALL_MS`` apart while it played
    (the server sends a reply's frames back to back, silence inside it included)."""
    count = 0
    for record in client.records:
        start, end = record.first_audio_out_at, record.finished_at
        if start is None or end is None:
            continue
        arrivals = [t for t, _ in client.heard if start <= t <= end]
        count += any(b - a > STALL_MS / 1000 for a, b in itertools.pairwise(arrivals))
    return count


async def converse(
    url: str,
    turns: Sequence[UserTurn],
    first: int,
    start_in: float,
    until_t: float,
    settle_s: float,
) -> Conversation:
    """Turns spoken one after another (from ``turns[first]`` on) until ``until_t``."""
    out = Conversation()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(start_in)
    try:
        async with pcm_client(url, "relay", {}) as client:
            n = first
            while loop.time() < until_t:
                turn = turns[n % len(turns)]
                n += 1
                out.results += await run_dialogue(
                    client, Dialogue(f"t{n}", [turn]), "relay", settle_s
                )
            out.stalls = stalls(client)
            out.errors += [f"{e.get('code')}: {e.get('message')}" for e in client.errors]
    except Exception as exc:  # counted against the level, not the end of the benchmark
        out.errors.append(f"connection: {type(exc).__name__}: {exc}")
    return out


def summarize_level(sessions: int, conversations: list[Conversation]) -> Json:
    results = [r for c in conversations for r in c.results]
    onsets = [x for r in results if (x := r.onset_ms) is not None]
    replies = [r.reply for r in results if r.reply is not None]
    underruns = sum(r.gap_ms >= UNDERRUN_MS for r in replies if r.first_audio_out_at is not None)
    asr_lags = [
        max(0.0, (r.transcript_at - r.turn_ended_at) * 1000)
        for r in replies
        if r.transcript_at is not None
    ]
    stalled = sum(c.stalls for c in conversations)
    errors = [e for c in conversations for e in c.errors]
    asr_lag_p90 = _pct(asr_lags, 90)
    keeping_up = asr_lag_p90 is not None and asr_lag_p90 <= ASR_LAG_MS
    return {
        "sessions": sessions,
        "turns": len(results),
        "unanswered": sum(r.onset_ms is None for r in results),
        "onset_ms_p50": _pct(onsets, 50),
        "onset_ms_p90": _pct(onsets, 90),
        "underruns": underruns,
        "stalls": stalled,
        "asr_lag_ms_p90": asr_lag_p90,
        "gap_ms_p90": _pct([r.gap_ms for r in replies], 90),
        "errors": errors,
        "realtime_ok": bool(results)
        and underruns == 0
        and stalled == 0
        and keeping_up
        and not errors,
    }


async def run_level(
    url: str, turns: Sequence[UserTurn], sessions: int, seconds: float, settle_s: float, seed: int
) -> Json:
    rng = random.Random(seed)
    until_t = asyncio.get_running_loop().time() + seconds
    conversations = await asyncio.gather(
        *(
            converse(
                url, turns, rng.randrange(len(turns)), rng.uniform(0, STAGGER_S), until_t, settle_s
            )
            for _ in range(sessions)
        )
    )
    return summarize_level(sessions, list(conversations))


# --- the server's resources --------------------------------------------------------------------


async def process_gauges(url: str) -> dict[str, float]:
    """RSS, threads, descriptors and tasks from the server's ``/metrics``."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    wanted = (
        "process_resident_memory_bytes",
        "process_threads",
        "process_open_fds",
        "relayvoice_asyncio_tasks",
        "relayvoice_sessions_active",
        "relayvoice_prompt_cache_bytes",
    )
    gauges = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            gauges[name] = float(value)
    return gauges


async def soak(url: str, turns: Sequence[UserTurn], seconds: float, settle_s: float) -> Json:
    """4 conversations for ``seconds``. Memory grows at first as buffers reach their working
    size at this concurrency; growth is counted from ``SOAK_WARM_SHARE`` of the way in (RSS
    before the soak is reported too). Tasks, threads and descriptors are compared with before
    the soak, once the clients have left."""
    before = await process_gauges(url)
    running = asyncio.create_task(run_level(url, turns, SOAK_SESSIONS, seconds, settle_s, seed=7))
    await asyncio.sleep(seconds * SOAK_WARM_SHARE)
    warm = await process_gauges(url)
    level = await running
    await asyncio.sleep(SETTLE_AFTER_S)
    after = await process_gauges(url)
    rss = (warm["process_resident_memory_bytes"], after["process_resident_memory_bytes"])
    return {
        "sessions": SOAK_SESSIONS,
        "seconds": seconds,
        "turns": level["turns"],
        "onset_ms_p90": level["onset_ms_p90"],
        "realtime_ok": level["realtime_ok"],
        "errors": level["errors"],
        "rss_mb_before": round(before["process_resident_memory_bytes"] / MIB, 1),
        "rss_mb_start": round(rss[0] / MIB, 1),
        "rss_mb_end": round(rss[1] / MIB, 1),
        "rss_growth_mb": round((rss[1] - rss[0]) / MIB, 1),
        # held by design, within llm.prompt_cache_mb per model: part of the growth above
        "prompt_cache_mb_start": round(warm["relayvoice_prompt_cache_bytes"] / MIB, 1),
        "prompt_cache_mb_end": round(after["relayvoice_prompt_cache_bytes"] / MIB, 1),
        "leaked_tasks": after["relayvoice_asyncio_tasks"] - before["relayvoice_asyncio_tasks"],
        "leaked_threads": after["process_threads"] - before["process_threads"],
        "leaked_fds": after["process_open_fds"] - before["process_open_fds"],
        "sessions_active_after": after["relayvoice_sessions_active"],
    }


# --- faults ------------------------------------------------------------------------------------


async def _speak(client: Client, turn: UserTurn, settle_s: float) -> list[TurnResult]:
    return await run_dialogue(client, Dialogue("fault", [turn]), "relay", settle_s)


async def abrupt_disconnects(url: str, turns: Sequence[UserTurn], settle_s: float) -> Json:
    """Clients that vanish (TCP reset, no close frame) mid-turn and mid-reply; then the server
    must have ended both sessions and still answer a new one."""
    cut = 0
    for mid_reply in (False, True):
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            async with pcm_client(url, "relay", {}) as client:
                assert isinstance(client, PcmClient)
                speaking = asyncio.create_task(_speak(client, turns[0], settle_s))
                if mid_reply:  # once the reply's first audio has come
                    await until(client.clock, lambda c=client: bool(c.heard), 30)
                else:  # half-way through the turn
                    await asyncio.sleep(turns[0].speech[1] / 2)
                client.abort()
                cut += 1
                speaking.cancel()
                await asyncio.gather(speaking, return_exceptions=True)
    await asyncio.sleep(SETTLE_AFTER_S)
    gauges = await process_gauges(url)
    async with pcm_client(url, "relay", {}) as client:
        results = await _speak(client, turns[1], settle_s)
    return {
        "disconnected": cut,
        "sessions_active_after": gauges["relayvoice_sessions_active"],
        "answered_after": results[0].onset_ms is not None,
        "ok": gauges["relayvoice_sessions_active"] == 0 and results[0].onset_ms is not None,
    }


async def kill_mid_conversation(
    server: Server, turns: Sequence[UserTurn], db: Path, settle_s: float
) -> Json:
    """Two conversations; once each has finished two replies and one is mid-reply, SIGKILL.
    Every reply a client saw finish must then be in the transcripts, word for word."""
    clients: list[Client] = []

    async def talk(first: int) -> None:
        async with pcm_client(server.url, "relay", {}) as client:
            clients.append(client)
            n = first
            while True:
                await _speak(client, turns[n % len(turns)], settle_s)
                n += 1

    talking = [asyncio.create_task(talk(k)) for k in (0, 5)]

    def mid_reply(client: Client) -> bool:
        last = client.records[-1].finished_at if client.records else None
        return bool(client.turns_ended) and last is not None and client.turns_ended[-1] > last

    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_WITHIN_S
    while loop.time() < deadline and not (
        len(clients) == 2
        and all(len(c.records) >= 2 for c in clients)
        and any(mid_reply(c) for c in clients)
    ):
        await asyncio.sleep(0.05)
    server.process.send_signal(signal.SIGKILL)
    await server.process.wait()
    for task in talking:
        task.cancel()
    await asyncio.gather(*talking, return_exceptions=True)
    store = TranscriptStore(db)
    try:
        completed, lost = 0, 0
        for client in clients:
            assert client.session_id is not None
            stored = {t["turn_id"]: t for t in store.export(client.session_id)["turns"]}
            for record in client.records:
                completed += 1
                kept = stored.get(record.turn_id)
                lost += kept is None or kept["heard_text"] != record.heard_text
        session_id = clients[0].session_id
    finally:
        store.close()
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "voice.cli",
            "--set",
            f"server.transcripts={db}",
            "sessions",
            "export",
            str(session_id),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "completed_turns_seen": completed,
        "lost_turns_after_kill": lost,
        "export_ok": exported.returncode == 0
        and len(json.loads(exported.stdout)["turns"]) >= len(clients[0].records),
    }


async def failing_backend(url: str, turns: Sequence[UserTurn], settle_s: float) -> Json:
    """The slow model's server is down: every reply fails. The client hears what the relay
    could say (the prefix, or the apology) and an error per reply; the third closes the
    session, saying why; a new conversation is still taken."""
    replies_failed, spoken, closed_with = 0, 0, ""
    async with pcm_client(url, "relay", {}) as client:
        assert isinstance(client, PcmClient)
        for n in range(3):
            results = await _speak(client, turns[n], settle_s)
            spoken += results[0].onset_ms is not None
        await until(client.clock, lambda: client.closed is not None, 10)
        replies_failed = sum(
            e.get("code") == "llm_error" and str(e.get("message")).startswith("reply ")
            for e in client.errors
        )
        closed_with = next(
            (str(e.get("message")) for e in client.errors if e.get("code") == "session_failed"), ""
        )
        close_code = client.closed
    try:
        async with pcm_client(url, "relay", {}) as client:
            taken = client.ready
    except ServerFailed:
        taken = False
    return {
        "replies_failed": replies_failed,
        "replies_spoken": spoken,
        "close_code": close_code,
        "closed_with": closed_with,
        "server_takes_new_sessions": taken,
        # the third failure hangs up at once, so its prefix may not be heard
        "ok": replies_failed >= 3 and spoken >= 2 and close_code == 1011 and taken,
    }


async def sigterm_mid_reply(
    server: Server, turns: Sequence[UserTurn], db: Path, settle_s: float
) -> Json:
    """SIGTERM while a reply plays: the reply finishes (or is stopped at the grace period), the
    transcript is closed with the reason, and the process exits 0."""
    loop = asyncio.get_running_loop()
    async with pcm_client(server.url, "relay", {}) as client:
        speaking = asyncio.create_task(_speak(client, turns[0], settle_s))
        await until(client.clock, lambda: bool(client.heard), 60)
        session_id = client.session_id
        sent_at = loop.time()
        server.process.send_signal(signal.SIGTERM)
        code = await server.process.wait()
        stopped_s = loop.time() - sent_at
        speaking.cancel()
        await asyncio.gather(speaking, return_exceptions=True)
        records = len(client.records)
    store = TranscriptStore(db)
    try:
        export = store.export(str(session_id))
    finally:
        store.close()
    return {
        "exit_code": code,
        "stopped_in_s": round(stopped_s, 2),
        "replies_seen": records,
        "turns_written": len(export["turns"]),
        "interruptions": [t["interruption"] for t in export["turns"]],
        "end_reason": export["session"]["end_reason"],
        "ok": code == 0
        and len(export["turns"]) >= records >= 1
        and export["session"]["end_reason"] == "the server shut down",
    }


# --- the run -----------------------------------------------------------------------------------


def _server_args(server_args: Sequence[str], db: Path, *extra: str) -> list[str]:
    unlimited = [
        f"server.max_sessions={max(MAX_LEVEL, SOAK_SESSIONS) + 2}",
        "server.admit_transcript_delay_ms=inf",
        "server.admit_loop_lag_ms=inf",
        f"server.transcripts={db}",
        *extra,
    ]
    return [*server_args, *(part for item in unlimited for part in ("--set", item))]


async def evaluate(
    settings: Settings, quick: bool, server_args: Sequence[str], soak_s: float
) -> Json:
    cases = dialogues(AsrModels(settings), settings, quick)  # before the server needs the CPU
    turns = [t for d in cases for t in d.turns]
    settle_s = settle_seconds(settings)
    report: Json = {"sessions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "transcripts.sqlite3"
        async with serve(_server_args(server_args, db)) as server:
            async with pcm_client(server.url, "relay", {}) as client:  # warm-up
                await _speak(client, turns[0], settle_s)
            levels: dict[str, Json] = {}
            sizes, best = list(LEVELS), 0
            for i, size in enumerate(sizes):  # grows while it keeps real time
                progress(i, len(sizes), f"{size} concurrent conversations")
                level = await run_level(server.url, turns, size, LEVEL_S[quick], settle_s, i)
                levels[str(size)] = level
                if level["realtime_ok"] and best == (sizes[i - 1] if i else 0):
                    best = size
                if size == sizes[-1] and best == size and size * 2 <= MAX_LEVEL:
                    sizes.append(size * 2)
            report["sessions"] = levels
            report["max_sessions_realtime"] = best
            progress(0, 1, "soak")
            report["soak"] = soaked = await soak(server.url, turns, soak_s, settle_s)
            report["soak_rss_growth_mb"] = soaked["rss_growth_mb"]
            progress(0, 1, "abrupt disconnects")
            report["disconnects"] = await abrupt_disconnects(server.url, turns, settle_s)
            progress(0, 1, "SIGKILL mid-conversation")
            report["kill"] = killed = await kill_mid_conversation(server, turns, db, settle_s)
            report["lost_turns_after_kill"] = killed["lost_turns_after_kill"]
        async with serve(_server_args(server_args, db)) as server:
            progress(0, 1, "SIGTERM mid-reply")
            report["sigterm"] = await sigterm_mid_reply(server, turns, db, settle_s)
        down = f"http://{HOST}:{free_port()}/v1"  # nobody listens there
        failing = _server_args(
            server_args, db, "llm.slow_backend=http", f"llm.http_base_url={down}"
        )
        async with serve(failing) as server:
            progress(1, 1, "a failing backend")
            report["failing_backend"] = await failing_backend(server.url, turns, settle_s)
    return report


def format_report(report: Json) -> str:
    levels = report["sessions"]
    assert isinstance(levels, dict)
    lines = [
        "sessions  turns  onset P50  onset P90  underruns  stalls  ASR lag P90  errors  real time",
    ]
    for size, level in levels.items():
        lines.append(
            f"{size:>8}  {level['turns']:>5}  {level['onset_ms_p50']!s:>9}  "
            f"{level['onset_ms_p90']!s:>9}  {level['underruns']:>9}  {level['stalls']:>6}  "
            f"{level['asr_lag_ms_p90']!s:>11}  {len(level['errors']):>6}  "
            f"{'yes' if level['realtime_ok'] else 'no':>9}"
        )
    soak_ = report["soak"]
    lines += [
        f"max_sessions_realtime: {report['max_sessions_realtime']}",
        f"soak: {soak_}",
        f"abrupt disconnects: {report['disconnects']}",
        f"SIGKILL: {report['kill']}",
        f"SIGTERM: {report['sigterm']}",
        f"failing backend: {report['failing_backend']}",
    ]
    return "\n".join(lines)


def main(
    settings: Settings,
    quick: bool,
    json_path: Path | None,
    server_args: Sequence[str] = (),
    soak_minutes: float | None = None,
) -> int:
    soak_s = SOAK_S[quick] if soak_minutes is None else soak_minutes * 60
    report = asyncio.run(evaluate(settings, quick, server_args, soak_s))
    return publish(report, format_report(report), json_path)
