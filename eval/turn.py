"""`relayvoice eval turn`: end-of-turn decisions on real speech, paced in real time.

Scenarios are built from real recordings (Asterisk prompts, one speaker, and LibriVox):

- ``end``: one utterance, then silence: a real turn end;
- ``joined``: two utterances of the same speaker with a 0.3-1.0 s pause between;
- ``cut``: one utterance cut at a word boundary near its middle (Whisper word timestamps),
  a 0.3-1.0 s pause, then the rest.

Each scenario streams through the same ASR stage and turn detector a session uses, with a
fixed 800 ms silence detector fed the very same events beside it as the baseline. A turn-ended
before the last part's true end is a false cut-off; decision latency runs from the true end of
speech (energy above the recording's noise floor) to turn-ended. Prompts alternate between the
``tune`` split (for choosing thresholds) and the ``eval`` split (reported).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asr.stage import AsrModels
from eval.asr import speech_bounds
from eval.datasets import Utterance, asterisk, librivox
from eval.report import progress, publish
from eval.turn_text import evaluate_text
from turn.detector import TurnModels
from voice.audio import resample
from voice.clock import RealClock
from voice.events import AudioFrame, Event, Metric, SpeechStarted, TurnEnded, TurnMaybeEnded
from voice.replay import stream
from voice.settings import Settings

LEAD_S = 0.3
TAIL_S = 2.5  # longer than the hard maximum wait (2 s) and the baseline
SEED = 7
QUICK_PER_KIND = 8


@dataclass
class Scenario:
    id: str
    kind: str  # end | joined | cut
    audio: np.ndarray
    rate: int
    true_end: float  # stream seconds where the last part's speech ends
    pause: tuple[float, float] | None = None  # the inserted mid-turn pause, stream seconds


@dataclass
class Outcome:
    scenario: Scenario
    ended: dict[str, list[float]] = field(default_factory=dict)  # detector -> turn-ended times
    maybe: list[float] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # the adaptive detector's, for reading
    # (stream time, silence start, P(complete) from audio, from text): each assessment of a pause
    evidence: list[tuple[float, float, float, float]] = field(default_factory=list)
    speech_starts: list[float] = field(default_factory=list)  # stream times the VAD said so

    def record(self) -> dict[str, object]:
        s = self.scenario
        return {
            "id": s.id,
            "kind": s.kind,
            "true_end": round(s.true_end, 3),
            "pause": s.pause and [round(x, 3) for x in s.pause],
            "ended": {k: [round(t, 3) for t in v] for k, v in self.ended.items()},
            "decisions": self.decisions,
            "evidence": self.evidence,
            "speech_starts": self.speech_starts,
        }

    def latency_ms(self, detector: str) -> float | None:
        after = [t for t in self.ended[detector] if t >= self.scenario.true_end]
        return (after[0] - self.scenario.true_end) * 1000 if after else None

    def cut_off(self, detector: str) -> bool:
        return any(t < self.scenario.true_end for t in self.ended[detector])


def _silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def trimmed(u: Utterance) -> Utterance:
    """The recording without its own lead and tail silence (kept 50 ms each side), so the
    pauses a scenario inserts are the pauses the listener hears."""
    start, end = speech_bounds(u.audio, u.sample_rate)
    a, b = max(0, int((start - 0.05) * u.sample_rate)), int((end + 0.05) * u.sample_rate)
    return dataclasses.replace(u, audio=u.audio[a:b])


def speech_stop(u: Utterance) -> float:
    return speech_bounds(u.audio, u.sample_rate)[1]


# Words after which an English sentence cannot be over: a cut there is mid-sentence for sure.
MID_SENTENCE_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "to",
        "of",
        "for",
        "from",
        "with",
        "in",
        "on",
        "at",
        "by",
        "into",
        "your",
        "my",
        "our",
        "their",
        "his",
        "her",
        "its",
        "and",
        "or",
        "but",
        "that",
        "which",
        "who",
        "when",
        "if",
        "because",
    ]
)
MAX_PROMPT_S = 6.0


def one_sentence(u: Utterance) -> bool:
    """Short prompts with no sentence break inside: one turn each, not a read paragraph."""
    return u.seconds <= MAX_PROMPT_S and not re.search(r"[.?!;:]\s+\S", u.text)


def cut_point(models: AsrModels, u: Utterance) -> float | None:
    """Seconds into ``u`` just after the mid-sentence word nearest its middle (Whisper word
    timestamps): the words before the cut cannot be a finished sentence."""
    segments, _ = models.whisper.transcribe(
        resample(u.audio, u.sample_rate, 16000), language="en", beam_size=1, word_timestamps=True
    )
    words = [w for s in segments for w in (s.words or [])]
    candidates = [
        i
        for i in range(2, len(words) - 1)
        if re.sub(r"\W", "", words[i - 1].word.lower()) in MID_SENTENCE_WORDS
    ]
    if not candidates:
        return None
    i = min(candidates, key=lambda i: abs(i - len(words) / 2))
    return (words[i - 1].end + words[i].start) / 2


def scenarios(models: AsrModels, split: str, quick: bool) -> list[Scenario]:
    rng = np.random.default_rng(SEED)
    prompts = [trimmed(u) for u in asterisk(min_words=4)[0 if split == "tune" else 1 :: 2]]
    prompts = [u for u in prompts if one_sentence(u)]
    rng.shuffle(prompts)  # type: ignore[arg-type]
    per_kind = QUICK_PER_KIND if quick else len(prompts) // 6
    books = 2 if quick else 5
    singles = [trimmed(u) for u in librivox()[:books]] + prompts[: per_kind - books]
    out = []
    for u in singles:
        audio = np.concatenate([_silence(LEAD_S, u.sample_rate), u.audio])
        end = LEAD_S + speech_stop(u)
        out.append(
            Scenario(
                u.id,
                "end",
                np.concatenate([audio, _silence(TAIL_S, u.sample_rate)]),
                u.sample_rate,
                end,
            )
        )
    pairs = prompts[per_kind : per_kind + 2 * per_kind]
    for a, b in zip(pairs[::2], pairs[1::2], strict=False):
        gap = float(rng.uniform(0.3, 1.0))
        first_end = LEAD_S + speech_stop(a)
        second = LEAD_S + a.seconds + gap
        audio = np.concatenate(
            [_silence(LEAD_S, a.sample_rate), a.audio, _silence(gap, a.sample_rate), b.audio]
        )
        out.append(
            Scenario(
                f"{a.id}+{b.id}",
                "joined",
                np.concatenate([audio, _silence(TAIL_S, a.sample_rate)]),
                a.sample_rate,
                second + speech_stop(b),
                (first_end, second),
            )
        )
    for u in prompts[3 * per_kind :][: per_kind * 2]:
        if len([s for s in out if s.kind == "cut"]) == per_kind:
            break
        at = cut_point(models, u)
        if at is None:
            continue
        gap, cut = float(rng.uniform(0.3, 1.0)), int(at * u.sample_rate)
        audio = np.concatenate(
            [
                _silence(LEAD_S, u.sample_rate),
                u.audio[:cut],
                _silence(gap, u.sample_rate),
                u.audio[cut:],
                _silence(TAIL_S, u.sample_rate),
            ]
        )
        out.append(
            Scenario(
                f"{u.id}@{at:.2f}",
                "cut",
                audio,
                u.sample_rate,
                LEAD_S + gap + speech_stop(u),
                (LEAD_S + at, LEAD_S + at + gap),
            )
        )
    return out


async def replay(asr: AsrModels, turn: TurnModels, scenario: Scenario) -> Outcome:
    clock = RealClock()
    outcome = Outcome(scenario, {"adaptive": [], "baseline": []})
    start = clock.now()

    def record(name: str) -> Callable[[Event], None]:
        def on(event: Event) -> None:
            if isinstance(event, TurnEnded):
                outcome.ended[name].append(clock.now() - start)
                if name == "adaptive":
                    at = clock.now() - start
                    outcome.decisions.append(f"{at:.2f} s {event.reason}: {event.transcript}")
            elif isinstance(event, TurnMaybeEnded) and name == "adaptive":
                outcome.maybe.append(clock.now() - start)
            elif isinstance(event, Metric) and name == "adaptive":
                labels = event.labels
                outcome.evidence.append(
                    (
                        clock.now() - start,
                        float(labels["silence_start"]),
                        float(labels["audio"]),
                        float(labels["text"]),
                    )
                )

        return on

    detectors = {
        "adaptive": turn.detector(clock, record("adaptive"), scenario.rate),
        "baseline": turn.detector(clock, record("baseline"), scenario.rate, mode="fixed"),
    }

    def to_detectors(event: Event) -> None:
        if isinstance(event, SpeechStarted):
            outcome.speech_starts.append(clock.now() - start)
        for detector in detectors.values():
            detector.on_event(event)

    stage = asr.stage(clock, to_detectors, scenario.rate)

    async def push(frame: AudioFrame) -> None:
        for detector in detectors.values():
            detector.push_audio(frame.samples)
        await stage.push(frame)

    await stream(clock, start, scenario.audio, scenario.rate, push)
    await stage.close()
    for detector in detectors.values():
        await detector.close()
    return outcome


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(outcomes: list[Outcome]) -> dict[str, float]:
    paused = [o for o in outcomes if o.scenario.pause is not None]
    report: dict[str, float] = {}
    for name, prefix in (("adaptive", ""), ("baseline", "baseline_")):
        latencies = [x for o in outcomes if (x := o.latency_ms(name)) is not None]
        report[f"{prefix}decision_latency_ms_p50"] = _percentile(latencies, 50)
        report[f"{prefix}decision_latency_ms_p90"] = _percentile(latencies, 90)
        report[f"{prefix}false_cutoff_rate"] = (
            sum(o.cut_off(name) for o in paused) / len(paused) if paused else float("nan")
        )
        report[f"{prefix}missed_turn_ends"] = sum(o.latency_ms(name) is None for o in outcomes)
    maybe = [
        (after[0] - o.scenario.true_end) * 1000
        for o in outcomes
        if (after := [t for t in o.maybe if t >= o.scenario.true_end])
    ]
    report["maybe_latency_ms_p50"] = _percentile(maybe, 50)
    return report


async def evaluate(settings: Settings, quick: bool, split: str) -> dict[str, object]:
    asr, turn = AsrModels(settings), TurnModels(settings)
    cases = scenarios(asr, split, quick)
    outcomes = []
    for n, scenario in enumerate(cases, 1):
        outcomes.append(await replay(asr, turn, scenario))
        progress(n, len(cases), f"{scenario.kind:6s} {scenario.id}")
    report: dict[str, object] = dict(summarize(outcomes))
    report |= evaluate_text(quick)
    report |= {
        "n_scenarios": len(outcomes),
        "n_mid_turn_pauses": sum(o.scenario.pause is not None for o in outcomes),
        "split": split,
        "scenarios": [o.record() for o in outcomes],
        "per_kind": {
            kind: summarize([o for o in outcomes if o.scenario.kind == kind])
            for kind in ("end", "joined", "cut")
        },
    }
    return report


def format_report(report: dict[str, object]) -> str:
    def ms(key: str) -> str:
        return f"{report[key]:.0f}"

    rows = [
        ("", "adaptive", "800 ms baseline"),
        (
            "decision latency P50 (ms)",
            ms("decision_latency_ms_p50"),
            ms("baseline_decision_latency_ms_p50"),
        ),
        (
            "decision latency P90 (ms)",
            ms("decision_latency_ms_p90"),
            ms("baseline_decision_latency_ms_p90"),
        ),
        (
            "false cut-off rate",
            f"{report['false_cutoff_rate']:.3f}",
            f"{report['baseline_false_cutoff_rate']:.3f}",
        ),
        (
            "missed turn ends",
            str(report["missed_turn_ends"]),
            str(report["baseline_missed_turn_ends"]),
        ),
        ("maybe-ended latency P50 (ms)", ms("maybe_latency_ms_p50"), ""),
        ("text accuracy complete", f"{report['text_accuracy_complete']:.3f}", ""),
        ("text accuracy incomplete", f"{report['text_accuracy_incomplete']:.3f}", ""),
        ("text accuracy stop", f"{report['text_accuracy_stop']:.3f}", ""),
        ("text ms per decision", f"{report['text_ms_per_decision']:.2f}", ""),
        (
            "scenarios / mid-turn pauses",
            f"{report['n_scenarios']} / {report['n_mid_turn_pauses']}",
            "",
        ),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{a.ljust(width[0])}  {b.rjust(width[1])}  {c.rjust(width[2])}" for a, b, c in rows
    )


def main(settings: Settings, quick: bool, split: str, json_path: Path | None) -> int:
    report = asyncio.run(evaluate(settings, quick, split))
    return publish(report, format_report(report), json_path)
