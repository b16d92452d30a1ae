"""`relayvoice eval relay`: reply quality and timing of relay, cascaded and fast, side by side.

Turns come from Topical-Chat ``test_freq_audio`` (never used for training or tuning): the user's
words are a real recogniser's output (``message_asr_A``), the three turns before are history.
For each turn, each mode gets the same events a session would send, on the real clock:

- speech-started, and the history pre-fill let finish, as it would while the user speaks;
- a partial transcript lacking the turn's last ``PARTIAL_LAG_WORDS`` words, put through the
  real end-of-turn detector, whose events go to the relay as a session sends them: the turn's
  words (the slow model reads them) and, where they sound finished, a speaking
  turn-maybe-ended (the relay drafts); that work is let finish too (a user speaks ~2.5
  words/s; the recogniser's partials come every ~260 ms, so the last one before the pause
  lacks about one word);
- turn-maybe-ended at the pause with every word, then turn-ended ``MAYBE_TO_END_S`` later
  (the median gap `eval turn` measured), then the final transcript.

The slow model then judges every full reply with the RelayS2S rubric
(``eval/judge_reply.txt``), seeing the same last ~200 words of context.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.report import progress, publish
from llm.backend import Message
from llm.models import LlmModels
from llm.verifier import WEIGHTS_FILE
from turn.detector import TurnModels
from voice.clock import RealClock
from voice.corpora import topical_chat
from voice.cpu import CpuGate
from voice.events import (
    Event,
    ResponseTextDelta,
    SpeechStarted,
    TranscriptPartial,
    TurnEnded,
    TurnMaybeEnded,
    TurnTranscript,
    TurnWords,
)
from voice.settings import Settings

MODES = ("relay", "cascaded", "fast")
MAYBE_TO_END_S = 0.12
PARTIAL_LAG_WORDS = 2
SPEAKING_RATE = 2.5  # words per second, for "was the continuation ready in time"
JUDGE_PROMPT = Path(__file__).with_name("judge_reply.txt")
CONTEXT_WORDS = 200
SEED = 5
QUICK_TURNS = 30
_CLAUSE = re.compile(r"[,.!?;:]")
RUBRIC = ("relevant", "helpful", "accurate", "clear")
_VERDICT = re.compile(r"(relevant|helpful|accurate|clear)\s*:\s*(yes|no)")


@dataclass
class Reply:
    mode: str
    text: str = ""
    prefix_ms: float | None = None  # turn-ended -> prefix text complete
    first_continuation_ms: float | None = None  # prefix -> first continuation text
    clause_ms: float | None = None  # prefix -> first continuation clause complete
    prefix_words: int = 0
    score: int = 0
    deltas: list[tuple[float, str, str]] = field(default_factory=list)


def turns(limit: int | None) -> list[tuple[list[Message], str]]:
    rng = np.random.default_rng(SEED)
    out = []
    for conversation in topical_chat("test_freq_audio").values():
        i = int(rng.integers(1, len(conversation)))
        user = conversation[i - 1].get("message_asr_A") or conversation[i - 1]["message"]
        history = [
            Message(role="user" if (i - 1 - j) % 2 == 0 else "assistant", content=t["message"])
            for j, t in enumerate(conversation[max(0, i - 4) : i - 1], start=max(0, i - 4))
        ]
        out.append((history, user.strip()))
    return out[:limit]


async def run_turn(
    models: LlmModels, turn_models: TurnModels, mode: str, history: list[Message], user: str
) -> Reply:
    clock = RealClock()
    reply = Reply(mode)
    ended_at = 0.0

    def collect(event: Event) -> None:
        if isinstance(event, ResponseTextDelta):
            reply.deltas.append((clock.now() - ended_at, event.text, event.source))

    relay = models.relay(clock, collect, mode=mode)
    relay.history += history
    relay.on_event(SpeechStarted(t=clock.now(), audio_time=0.0))
    await relay.idle()  # the history pre-fill a session does while the user speaks

    def while_speaking(event: Event) -> None:
        if isinstance(event, TurnWords | TurnMaybeEnded):
            relay.on_event(event)

    detector = turn_models.detector(clock, while_speaking)
    heard = " ".join(user.split()[:-PARTIAL_LAG_WORDS])
    if heard:
        detector.on_event(TranscriptPartial(t=clock.now(), committed=heard, tentative=""))
        await relay.idle()  # speculation while the user speaks
    await detector.close()
    relay.on_event(TurnMaybeEnded(t=clock.now(), transcript=user, p_complete=0.9))
    await clock.sleep(MAYBE_TO_END_S)
    ended_at = clock.now()
    relay.on_event(TurnEnded(t=ended_at, transcript=user, reason="eval"))
    relay.on_event(TurnTranscript(t=ended_at, transcript=user))
    await relay.wait()
    done = [m for m in relay.history if m.role == "assistant"][-1]
    reply.text = done.content
    prefix = [(t, text) for t, text, source in reply.deltas if source == "prefix"]
    rest = [(t, text) for t, text, source in reply.deltas if source == "continuation"]
    if prefix:
        reply.prefix_ms = prefix[0][0] * 1000
        reply.prefix_words = len(prefix[0][1].split())
    if prefix and rest:
        reply.first_continuation_ms = (rest[0][0] - prefix[0][0]) * 1000
        text = ""
        for t, piece in rest:
            text += piece
            if _CLAUSE.search(text) or len(text.split()) >= 6 or (t, piece) == rest[-1]:
                reply.clause_ms = (t - prefix[0][0]) * 1000
                break
    return reply


async def judge(models: LlmModels, history: list[Message], user: str, reply: str) -> int:
    lines = [f"{m.role.title()}: {m.content}" for m in history] + [f"User: {user}"]
    context = " ".join("\n".join(lines).split(" ")[-CONTEXT_WORDS:])
    prompt = JUDGE_PROMPT.read_text().format(context=context, reply=reply)
    answer = "".join(
        [t.text async for t in models.slow.stream([Message(role="user", content=prompt)], "", 32)]
    )
    return rubric_score(answer)


def rubric_score(answer: str) -> int:
    """The RelayS2S 1-5 scale from the judge's four yes/no points: 1 + the points met, at
    most 3 when the reply is not accurate (made up or harmful). A point it did not answer
    counts as no. Four explicit points keep a small judge from rating everything 5."""
    verdicts = dict(_VERDICT.findall(answer.lower()))
    met = sum(verdicts.get(point) == "yes" for point in RUBRIC)
    score = 1 + met
    return min(score, 3) if verdicts.get("accurate") != "yes" else score


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def evaluate(settings: Settings, quick: bool) -> dict[str, object]:
    gate = CpuGate()  # as in a session: the draft goes before the slow model's reading
    models = LlmModels(settings, gate)
    turn_models = TurnModels(settings, gate)
    await models.warm()
    cases = turns(QUICK_TURNS if quick else None)
    replies: dict[str, list[Reply]] = {mode: [] for mode in MODES}
    for n, (history, user) in enumerate(cases, 1):
        for mode in MODES:
            reply = await run_turn(models, turn_models, mode, history, user)
            reply.score = await judge(models, history, user, reply.text)
            replies[mode].append(reply)
        progress(n, len(cases), user)
    models.close()
    relay = replies["relay"]
    kept = [r for r in relay if r.prefix_ms is not None]
    quality = {m: float(np.mean([r.score for r in replies[m]])) for m in MODES}
    verifier = WEIGHTS_FILE.with_suffix(".json")
    ready = [
        r.clause_ms is not None and r.clause_ms <= r.prefix_words / SPEAKING_RATE * 1000
        for r in kept
    ]
    return {
        "n_turns": len(cases),
        "keep_rate": len(kept) / max(1, len(relay)),
        "quality_relay": quality["relay"],
        "quality_slow": quality["cascaded"],
        "quality_fast": quality["fast"],
        "quality_retained": quality["relay"] / quality["cascaded"],
        "low_quality_rate_relay": float(np.mean([r.score <= 3 for r in relay])),
        "low_quality_rate_slow": float(np.mean([r.score <= 3 for r in replies["cascaded"]])),
        "prefix_ms_p50": _p([r.prefix_ms for r in kept], 50),  # type: ignore[misc]
        "prefix_ms_p90": _p([r.prefix_ms for r in kept], 90),  # type: ignore[misc]
        "slow_first_token_ms_p50": _p(
            [r.first_continuation_ms for r in kept if r.first_continuation_ms is not None], 50
        ),
        "continuation_ready_rate": float(np.mean(ready)) if ready else float("nan"),
        "verifier_auroc_validation": json.loads(verifier.read_text())["verifier_auroc_validation"],
        "draft_model": settings.llm.draft_model,
        "slow_model": settings.llm.slow_model,
        "replies": [
            {"user": user, **{m: reply_record(replies[m][i]) for m in MODES}}
            for i, (_, user) in enumerate(cases)
        ],
    }


def reply_record(reply: Reply) -> dict[str, object]:
    """One reply in the JSON: its text, score and (relay) timings, to see which turns lag."""
    record: dict[str, object] = {"text": reply.text, "score": reply.score}
    if reply.prefix_ms is not None:
        record |= {
            "prefix_words": reply.prefix_words,
            "prefix_ms": round(reply.prefix_ms, 1),
            "first_continuation_ms": _rounded(reply.first_continuation_ms),
            "clause_ms": _rounded(reply.clause_ms),
        }
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_report(report: dict[str, object]) -> str:
    keys = [k for k, v in report.items() if isinstance(v, int | float)]
    width = max(len(k) for k in keys)
    return "\n".join(
        f"{k.ljust(width)}  {report[k]:.3f}"
        if isinstance(report[k], float)
        else f"{k.ljust(width)}  {report[k]}"
        for k in keys
    )


def main(settings: Settings, quick: bool, json_path: Path | None) -> int:
    report = asyncio.run(evaluate(settings, quick))
    return publish(report, format_report(report), json_path)
