"""`relayvoice eval latency`: voice in to voice out, through the live session, in real time.

Multi-turn dialogues of real recorded speech (Asterisk prompts of the ``eval`` half — the
other half tuned the end-of-turn thresholds — LibriVox sentences and the pyannote sample
call's segments, all at 16 kHz) are spoken into a session by a microphone that never stops
(silence between turns), and the session's audio is read by a player every 20 ms, both on the
real clock. Some turns hold a mid-turn pause (two prompts joined, or one cut mid-sentence): a
reply started before the turn's true end is a false cut-off. After some replies the next turn
starts 1 s into the reply: a barge-in. Every dialogue runs in each mode (relay, cascaded,
fast) on the same audio, modes interleaved so that machine noise hits all alike.

Onset is measured where the audio leaves the session: from the turn's true end of speech
(energy above the recording's noise floor) to the reply's first sample read by the player.
Once a reply's audio has all been produced (no gap is possible any more) the player reads the
rest at once instead of in real time, so the benchmark does not sit through long replies.

With ``--transport ws|webrtc`` the same dialogues go through a real ``relayvoice serve`` in a
process of its own, and onset is measured at the client (``eval/transport.py``).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asr.stage import AsrModels
from eval.asr import speech_bounds
from eval.datasets import Utterance, asterisk, librivox, phone_call
from eval.report import progress, publish
from eval.turn import cut_point, one_sentence, trimmed
from voice.audio import resample
from voice.clock import Clock, RealClock
from voice.engine import Engine
from voice.events import AudioFrame
from voice.replay import FRAME_S
from voice.session import Session, TurnRecord
from voice.settings import RelayMode, Settings

RATE = 16000
MODES: tuple[RelayMode, ...] = ("relay", "cascaded", "fast")
IN_PROCESS = "in-process"
SEED = 11
TURNS_PER_DIALOGUE = 3
QUICK_DIALOGUES = 6
FULL_DIALOGUES = 16
BARGE_IN_AFTER_S = 1.0  # into the reply's audio
BETWEEN_TURNS_S = 0.6  # the user's own gap after a reply ends
REPLY_CAP_S = 40.0  # a reply not heard in full this long after the turn is given up on


@dataclass
class UserTurn:
    id: str
    kind: str  # plain | joined | cut
    audio: np.ndarray  # 16 kHz
    speech: tuple[float, float]  # first and last voiced second of ``audio``
    pause: tuple[float, float] | None = None  # an inserted mid-turn pause
    barge_in: bool = False  # the next turn starts over this turn's reply


@dataclass
class Dialogue:
    id: str
    turns: list[UserTurn]


@dataclass
class ClientTimes:
    """A turn as a client of ``relayvoice serve`` saw it (clock seconds: the client and the
    server share the system's monotonic clock)."""

    end_sent_at: float  # the frame holding the turn's true end of speech was sent
    heard_at: float | None = None  # the reply's first non-silent frame was received


@dataclass
class TurnResult:
    dialogue: str
    mode: str
    turn: UserTurn
    started_at: float  # clock time of the turn's first sample
    records: list[TurnRecord] = field(default_factory=list)  # replies started during the turn
    reply: TurnRecord | None = None  # the reply to the whole turn
    barge_in_at: float | None = None  # clock time the next turn's speech began over this reply
    client: ClientTimes | None = None  # over a transport: what the client saw

    @property
    def true_end(self) -> float:
        """The true end of speech: its sample's clock time, or over a transport the time the
        frame holding it was sent."""
        if self.client is not None:
            return self.client.end_sent_at
        return self.started_at + self.turn.speech[1]

    @property
    def session_onset_ms(self) -> float | None:
        """True end to the reply's first sample read from the session's playout."""
        if self.reply is None or self.reply.first_audio_out_at is None:
            return None
        return (self.reply.first_audio_out_at - self.true_end) * 1000

    @property
    def onset_ms(self) -> float | None:
        """True end to the reply's first sound where the listener is: read from the session
        in process, received by the client over a transport."""
        if self.client is None:
            return self.session_onset_ms
        if self.client.heard_at is None:
            return None
        return (self.client.heard_at - self.true_end) * 1000

    @property
    def transport_overhead_ms(self) -> float | None:
        """What the transport adds to the onset: the client's minus the session's."""
        onset, session = self.onset_ms, self.session_onset_ms
        if self.client is None or onset is None or session is None:
            return None
        return onset - session

    @property
    def cut_off(self) -> bool:
        return any(r.turn_ended_at < self.true_end for r in self.records)

    @property
    def bargein_stop_ms(self) -> float | None:
        r = self.reply
        if self.barge_in_at is None or r is None or r.speech_over_at is None:
            return None
        return (r.speech_over_at - self.barge_in_at) * 1000

    def row(self) -> dict[str, object]:
        r = self.reply

        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - self.true_end) * 1000, 1)

        return {
            "dialogue": self.dialogue,
            "mode": self.mode,
            "turn": self.turn.id,
            "kind": self.turn.kind,
            "barge_in": self.barge_in_at is not None,
            "false_cutoff": self.cut_off,
            "onset_ms": None if self.onset_ms is None else round(self.onset_ms, 1),
            "transport_overhead_ms": None
            if self.transport_overhead_ms is None
            else round(self.transport_overhead_ms, 1),
            "speech_ended_ms": ms(r and r.speech_ended_at),
            "turn_ended_ms": ms(r and r.turn_ended_at),
            "transcript_ms": ms(r and r.transcript_at),
            "first_text_ms": ms(r and r.first_text_at),
            "first_tts_audio_ms": ms(r and r.first_tts_audio_at),
            "first_audio_out_ms": ms(r and r.first_audio_out_at),
            "continuation_audio_out_ms": ms(r and r.continuation_audio_out_at),
            "gap_ms": r and round(r.gap_ms, 1),
            "bargein_stop_ms": self.bargein_stop_ms and round(self.bargein_stop_ms, 1),
            "verdict": r and r.verdict,
            "turn_reason": r and r.turn_reason,
            "user_text": r and r.user_text,
            "prefix": r and r.prefix_text,
            "reply": r and r.reply_text,
            "heard": r and r.heard_text,
            "interruption": r and r.interruption,
        }


# --- the dialogues ---------------------------------------------------------------------------


def _at_16k(u: Utterance) -> Utterance:
    return dataclasses.replace(u, audio=resample(u.audio, u.sample_rate, RATE), sample_rate=RATE)


def _plain(u: Utterance) -> UserTurn:
    return UserTurn(u.id, "plain", u.audio, speech_bounds(u.audio, RATE))


def _with_pause(kind: str, id_: str, a: np.ndarray, b: np.ndarray, gap: float) -> UserTurn:
    audio = np.concatenate([a, np.zeros(int(gap * RATE), np.float32), b])
    first, _ = speech_bounds(a, RATE)
    pause = (speech_bounds(a, RATE)[1], len(a) / RATE + gap)
    return UserTurn(id_, kind, audio, (first, pause[1] + speech_bounds(b, RATE)[1]), pause)


def dialogues(models: AsrModels, settings: Settings, quick: bool) -> list[Dialogue]:
    """Deterministic dialogues: turn kinds round-robin plain, joined, cut; every third dialogue
    has a barge-in into its first reply."""
    rng = np.random.default_rng(SEED)
    prompts = [_at_16k(trimmed(u)) for u in asterisk(min_words=4)[1::2]]
    prompts = [u for u in prompts if one_sentence(u)]
    rng.shuffle(prompts)  # type: ignore[arg-type]
    others = [_at_16k(trimmed(u)) for u in librivox()]
    others += [
        _at_16k(trimmed(u))
        for u in phone_call(settings.models.cache_dir / "data")
        if len(u.text.split()) >= 4 and u.seconds >= 1.2
    ]
    count = QUICK_DIALOGUES if quick else FULL_DIALOGUES
    pool, turns = iter(prompts), []
    for n in range(count * TURNS_PER_DIALOGUE):
        kind = ("plain", "joined", "cut")[n % 3]
        if kind == "plain":
            u = others[(n // 3) % len(others)] if n % 2 == 0 else next(pool)
            turns.append(_plain(u))
        elif kind == "joined":
            a, b = next(pool), next(pool)
            gap = float(rng.uniform(0.3, 1.0))
            turns.append(_with_pause(kind, f"{a.id}+{b.id}", a.audio, b.audio, gap))
        else:
            while (at := cut_point(models, u := next(pool))) is None:
                pass
            cut, gap = int(at * RATE), float(rng.uniform(0.3, 1.0))
            turns.append(_with_pause(kind, f"{u.id}@{at:.2f}", u.audio[:cut], u.audio[cut:], gap))
    out = []
    for d in range(count):
        chunk = turns[d * TURNS_PER_DIALOGUE : (d + 1) * TURNS_PER_DIALOGUE]
        if d % 3 == 1:
            chunk[0] = dataclasses.replace(chunk[0], barge_in=True)
        out.append(Dialogue(f"d{d:02d}", chunk))
    return out


# --- replay ------------------------------------------------------------------------------------


class Microphone:
    """Pushes a frame every 20 ms: the user's speech when there is some, silence otherwise."""

    def __init__(
        self, push: Callable[[AudioFrame], Awaitable[None]], clock: Clock, rate: int = RATE
    ) -> None:
        self._push, self._clock, self._rate = push, clock, rate
        self._pending = np.zeros(0, np.float32)
        self._started: asyncio.Future[float] | None = None
        self._sent: list[float] = []  # clock time each frame of the speech was pushed
        self._step = int(FRAME_S * rate)

    def say(self, audio: np.ndarray) -> asyncio.Future[float]:
        """Queue speech (at the microphone's rate); the future gives the clock time of its first
        sample."""
        self._pending = audio
        self._started = asyncio.get_running_loop().create_future()
        self._sent = []
        return self._started

    @property
    def speaking(self) -> bool:
        return len(self._pending) > 0

    def sent_at(self, second: float) -> float | None:
        """Clock time the frame holding ``second`` (into the last speech) was pushed, if yet."""
        frame = max(math.ceil(second * self._rate) - 1, 0) // self._step
        return self._sent[frame] if frame < len(self._sent) else None

    async def run(self) -> None:
        deadline = self._clock.now()
        while True:
            deadline += FRAME_S
            await self._clock.sleep_until(deadline)
            frame = np.zeros(self._step, np.float32)
            speech, self._pending = self._pending[: self._step], self._pending[self._step :]
            frame[: len(speech)] = speech
            if len(speech):
                self._sent.append(self._clock.now())
                if self._started is not None and not self._started.done():
                    self._started.set_result(deadline - FRAME_S)  # recorded from then on
            await self._push(AudioFrame(t=deadline, samples=frame, sample_rate=self._rate))


class Player:
    """Reads the session's audio every 20 ms; a reply whose audio is all produced is read at
    once (``fast_forward``) unless a barge-in into it is planned."""

    def __init__(self, session: Session, clock: Clock) -> None:
        self._playout, self._clock = session.playout, clock
        self.fast_forward = True

    async def run(self) -> None:
        count = round(FRAME_S * self._playout.sample_rate)
        deadline = self._clock.now()
        while True:
            turn = self._playout.turn
            if (
                self.fast_forward
                and turn is not None
                and turn.produced_all
                and turn.first_audio_at is not None
                and not self._playout.paused
            ):
                rest = round(self._playout.queued_seconds * self._playout.sample_rate)
                self._playout.read(max(count, rest + count))
            else:
                self._playout.read(count)
            deadline += FRAME_S
            await self._clock.sleep_until(deadline)


async def until(clock: Clock, done: Callable[[], bool], timeout: float) -> bool:
    deadline = clock.now() + timeout
    while not done():
        if clock.now() > deadline:
            return False
        await clock.sleep(0.02)
    return True


async def run_dialogue(
    engine: Engine, dialogue: Dialogue, mode: RelayMode, settle_s: float
) -> list[TurnResult]:
    clock = RealClock()
    session = engine.session(clock, input_rate=RATE, mode=mode)
    mic, player = Microphone(session.push, clock), Player(session, clock)
    tasks = [asyncio.create_task(mic.run()), asyncio.create_task(player.run())]
    results: list[TurnResult] = []
    barged: float | None = None  # the next turn already began, over the last reply
    try:
        for i, turn in enumerate(dialogue.turns):
            # Real time for a reply that will be barged into, and while one is being.
            player.fast_forward = not turn.barge_in and barged is None
            started = barged if barged is not None else await mic.say(turn.audio)
            barged = None
            result = TurnResult(dialogue.id, mode, turn, started)
            results.append(result)
            await until(clock, lambda: not mic.speaking, 60)
            await until(clock, lambda r=result: _reply(session, r) is not None, settle_s + 1)
            reply = _reply(session, result)
            if turn.barge_in and reply is not None and i + 1 < len(dialogue.turns):
                barged = await _barge_in(session, clock, mic, reply, dialogue.turns[i + 1])
                if barged is not None:
                    result.barge_in_at = barged + dialogue.turns[i + 1].speech[0]
                    continue
            await until(clock, lambda: not session.busy, REPLY_CAP_S)
            await clock.sleep(BETWEEN_TURNS_S)
        await until(clock, lambda: not session.busy, settle_s + REPLY_CAP_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    assign(results, session.records)
    return results


def _reply(session: Session, result: TurnResult) -> TurnRecord | None:
    """The reply to the whole turn (its turn ended after the turn's true end), once begun."""
    replies = [
        r for r in [*session.records, *session.open_records] if r.turn_ended_at >= result.true_end
    ]
    return replies[0] if replies else None


async def _barge_in(
    session: Session, clock: Clock, mic: Microphone, reply: TurnRecord, nxt: UserTurn
) -> float | None:
    """Start ``nxt`` ``BARGE_IN_AFTER_S`` into ``reply``'s audio; its start time, or None when
    the reply was over before then."""

    def first_audio() -> float | None:
        turn = session.playout.turn
        return turn.first_audio_at if turn is not None and turn.turn_id == reply.turn_id else None

    def over() -> bool:
        turn = session.playout.turn
        return turn is None or turn.turn_id != reply.turn_id

    await until(clock, lambda: over() or first_audio() is not None, 30)
    if (begun := first_audio()) is None:
        return None
    await clock.sleep_until(begun + BARGE_IN_AFTER_S)
    if over():
        return None
    return await mic.say(nxt.audio)


def assign(results: list[TurnResult], records: list[TurnRecord]) -> None:
    """Give each user turn the replies started while it was spoken and the one that answered it."""
    for n, result in enumerate(results):
        until = results[n + 1].started_at if n + 1 < len(results) else float("inf")
        mine = [r for r in records if result.started_at <= r.turn_ended_at < until]
        result.records = mine
        answers = [r for r in mine if r.turn_ended_at >= result.true_end]
        result.reply = answers[0] if answers else None


# --- report ------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarize(results: list[TurnResult]) -> dict[str, object]:
    onsets = [x for r in results if (x := r.onset_ms) is not None]
    paused = [r for r in results if r.turn.pause is not None]
    replies = [r.reply for r in results if r.reply is not None]
    gaps = [r.gap_ms for r in replies if r.first_audio_out_at is not None]
    stops = [x for r in results if (x := r.bargein_stop_ms) is not None]

    def stage_ms(start: str, end: str) -> float | None:
        spans = [
            (getattr(r, end) - getattr(r, start)) * 1000
            for r in replies
            if getattr(r, end) is not None and getattr(r, start) is not None
        ]
        return _pct(spans, 50)

    decision = [(r.reply.turn_ended_at - r.true_end) * 1000 for r in results if r.reply is not None]
    summary: dict[str, object] = {
        "n_turns": len(results),
        "onset_ms_p50": _pct(onsets, 50),
        "onset_ms_p90": _pct(onsets, 90),
        "onset_ms_p99": _pct(onsets, 99),
        "continuation_gap_ms_p90": _pct(gaps, 90),
        "false_cutoff_rate": round(sum(r.cut_off for r in paused) / len(paused), 3)
        if paused
        else None,
        "bargein_stop_ms_p90": _pct(stops, 90),
        "n_bargeins": len(stops),
        "unanswered_turns": sum(r.onset_ms is None for r in results),
        "keep_rate": round(sum(r.verdict == "accepted" for r in replies) / len(replies), 3)
        if replies
        else None,
        "breakdown_ms_p50": {
            "true_end_to_turn_ended": _pct(decision, 50),
            "turn_ended_to_first_text": stage_ms("turn_ended_at", "first_text_at"),
            "first_text_to_first_tts_audio": stage_ms("first_text_at", "first_tts_audio_at"),
            "first_tts_audio_to_audio_out": stage_ms("first_tts_audio_at", "first_audio_out_at"),
        },
    }
    if any(r.client is not None for r in results):
        sessions = [x for r in results if (x := r.session_onset_ms) is not None]
        overheads = [x for r in results if (x := r.transport_overhead_ms) is not None]
        summary |= {
            "session_onset_ms_p50": _pct(sessions, 50),
            "transport_overhead_ms_p50": _pct(overheads, 50),
            "transport_overhead_ms_p90": _pct(overheads, 90),
        }
    return summary


def build_report(
    results: list[TurnResult], modes: Sequence[RelayMode], transport: str
) -> dict[str, object]:
    """Per mode summaries, the relay's advantage and, over a transport, its overhead."""
    summaries = {m: summarize([r for r in results if r.mode == m]) for m in modes}
    relay = summaries.get("relay", {}).get("onset_ms_p90")
    cascaded = summaries.get("cascaded", {}).get("onset_ms_p90")
    report: dict[str, object] = {
        "transport": transport,
        "n_turns": len(results) // len(modes),
        "modes": summaries,
        "onset_ratio_p90_relay_vs_cascaded": round(relay / cascaded, 3)  # type: ignore[operator]
        if relay and cascaded
        else None,
    }
    if transport != IN_PROCESS:
        overheads = [x for r in results if (x := r.transport_overhead_ms) is not None]
        report["transport_overhead_ms_p50"] = _pct(overheads, 50)
    report["turns"] = [r.row() for r in results]
    return report


def format_report(report: dict[str, object]) -> str:
    modes: dict[str, dict[str, object]] = report["modes"]  # type: ignore[assignment]
    keys = [
        "onset_ms_p50",
        "onset_ms_p90",
        "onset_ms_p99",
        "continuation_gap_ms_p90",
        "false_cutoff_rate",
        "bargein_stop_ms_p90",
        "keep_rate",
        "unanswered_turns",
    ]
    if report["transport"] != IN_PROCESS:
        keys += ["session_onset_ms_p50", "transport_overhead_ms_p50", "transport_overhead_ms_p90"]
    lines = ["metric | " + " | ".join(modes), "---|" + "---|" * len(modes)]
    lines += [f"{k} | " + " | ".join(str(modes[m][k]) for m in modes) for k in keys]
    first: dict[str, object] = next(iter(modes.values()))["breakdown_ms_p50"]  # type: ignore[assignment]
    for part in first:
        values = [str(modes[m]["breakdown_ms_p50"][part]) for m in modes]  # type: ignore[index]
        lines.append(f"{part} p50 | " + " | ".join(values))
    lines.append(
        f"\ntransport {report['transport']}; n_turns {report['n_turns']}; "
        f"onset p90 relay / cascaded {report['onset_ratio_p90_relay_vs_cascaded']}"
    )
    if "transport_overhead_ms_p50" in report:
        lines.append(f"transport overhead p50 (ms) {report['transport_overhead_ms_p50']}")
    return "\n".join(lines)


def write_csv(results: list[TurnResult], path: Path) -> None:
    rows = [r.row() for r in results]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(results: list[TurnResult], path: Path, transport: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        onsets = sorted(x for r in results if r.mode == mode and (x := r.onset_ms) is not None)
        if onsets:
            ax.plot(onsets, np.arange(1, len(onsets) + 1) / len(onsets), label=mode, marker=".")
    ax.axvline(200, color="grey", linestyle=":", label="human turn gap (~200 ms)")
    where = "first reply sample" if transport == IN_PROCESS else "first reply audio at the client"
    ax.set_xlabel(f"onset: true end of speech → {where} (ms)")
    ax.set_ylabel("share of turns")
    ax.set_title(f"relayvoice eval latency ({transport}): onset distribution per mode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def evaluate(settings: Settings, quick: bool, modes: Sequence[RelayMode]) -> list[TurnResult]:
    """Every dialogue in every mode through in-process sessions, modes interleaved."""
    engine = Engine(settings)
    try:
        cases = dialogues(engine.asr_models, settings, quick)
        settle_s = settle_seconds(settings)
        await engine.warm()
        await run_dialogue(engine, Dialogue("warm-up", cases[0].turns[:1]), modes[0], settle_s)
        results: list[TurnResult] = []
        total, n = len(cases) * len(modes), 0
        for dialogue in cases:
            for mode in modes:
                results += await run_dialogue(engine, dialogue, mode, settle_s)
                n += 1
                progress(n, total, f"{dialogue.id} {mode}")
    finally:
        engine.close()
    return results


def settle_seconds(settings: Settings) -> float:
    """How long a reply may take to begin after the user has stopped speaking."""
    return settings.turn.max_silence_ms / 1000 + 0.5


def main(
    settings: Settings,
    quick: bool,
    json_path: Path | None,
    csv_path: Path,
    plot_path: Path,
    transport: str = IN_PROCESS,
    modes: Sequence[RelayMode] = MODES,
    server_args: Sequence[str] = (),
) -> int:
    """``server_args``: the command line's global options (``--config``, ``--set``), given to
    the server a transport run starts so that it runs on the same settings."""
    if transport == IN_PROCESS:
        results = asyncio.run(evaluate(settings, quick, modes))
    else:
        from eval.transport import evaluate as evaluate_transport

        results = asyncio.run(evaluate_transport(settings, quick, modes, transport, server_args))
    report = build_report(results, modes, transport)
    write_csv(results, csv_path)
    plot(results, plot_path, transport)
    return publish(report, format_report(report), json_path)
