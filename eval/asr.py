"""`relayvoice eval asr`: the streaming recogniser on real speech, paced in real time.

Each utterance is streamed in 20 ms frames, each frame handed over only once it would have
been fully recorded (the real clock), after 0.2 s of lead silence and followed by 1 s of
silence, through the same ``AsrModels.stage`` a session uses. Measured per utterance:
the finals (WER), when the last final arrived relative to the true end of speech, every
partial (interval, and how many of its words the final changed), and decoder compute (RTF).
The offline reference decodes the whole utterance in one ``transcribe`` call with the same
model and greedy decoding, as the streaming decodes do. Without ``temperature=0``,
``transcribe`` falls back to sampling when a decode looks like a loop, and the reference moved
between runs of the same code (WER 0.158 and 0.165 in two `--quick` runs).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import numpy as np

from asr.stage import AsrModels
from eval.datasets import Utterance, asterisk, librivox, phone_call
from eval.report import progress, publish
from eval.text import normalize
from voice.audio import resample
from voice.clock import RealClock
from voice.events import Event, TranscriptFinal, TranscriptPartial
from voice.replay import stream
from voice.settings import Settings

LEAD_S = 0.2
TAIL_S = 1.0
QUICK_ASTERISK = 12


@dataclass
class Replay:
    utterance: Utterance
    true_end: float  # seconds into the stream where speech really ends
    finals: list[tuple[float, str]] = field(default_factory=list)  # (stream seconds, text)
    partials: list[tuple[float, str]] = field(default_factory=list)  # (stream seconds, shown text)
    decode_ms: float = 0.0

    @property
    def transcript(self) -> str:
        return " ".join(text for _, text in self.finals if text)


def speech_bounds(audio: np.ndarray, rate: int) -> tuple[float, float]:
    """Where speech really starts and ends in a clean recording: the first and last 10 ms
    frames clearly above the recording's own noise floor (the annotation these datasets do
    not carry)."""
    hop = rate // 100
    frames = len(audio) // hop
    if frames == 0:
        return 0.0, len(audio) / rate
    rms = np.sqrt((audio[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1))
    threshold = max(0.03 * rms.max(), 3 * np.percentile(rms, 10))
    loud = np.nonzero(rms > threshold)[0]
    if not len(loud):
        return 0.0, len(audio) / rate
    return loud[0] * hop / rate, (loud[-1] + 1) * hop / rate


def speech_end(audio: np.ndarray, rate: int) -> float:
    return speech_bounds(audio, rate)[1]


async def replay(models: AsrModels, utterance: Utterance, paced: bool = True) -> Replay:
    rate = utterance.sample_rate
    lead, tail = np.zeros(int(LEAD_S * rate), np.float32), np.zeros(int(TAIL_S * rate), np.float32)
    audio = np.concatenate([lead, utterance.audio, tail])
    result = Replay(utterance, LEAD_S + speech_end(utterance.audio, rate))
    clock = RealClock()
    shown_before = ""  # finals already out, shown in front of the current partial

    def collect(event: Event) -> None:
        nonlocal shown_before
        at = clock.now() - start
        if isinstance(event, TranscriptPartial):
            result.partials.append((at, f"{shown_before} {event.text}".strip()))
        elif isinstance(event, TranscriptFinal):
            result.finals.append((at, event.text))
            shown_before = result.transcript

    stage = models.stage(clock, collect, rate)
    start = clock.now()
    await stream(clock, start, audio, rate, stage.push, paced)
    await stage.close()
    result.decode_ms = stage.decode_ms
    return result


def revision_rate(replays: list[Replay]) -> float:
    """Share of words shown in partials that the final transcript does not keep in place."""
    shown = revised = 0
    for r in replays:
        final = normalize(r.transcript).split()
        for _, text in r.partials:
            words = normalize(text).split()
            shown += len(words)
            revised += sum(1 for i, w in enumerate(words) if i >= len(final) or final[i] != w)
    return revised / shown if shown else 0.0


def offline_transcript(models: AsrModels, utterance: Utterance) -> str:
    audio = resample(utterance.audio, utterance.sample_rate, 16000)
    segments, _ = models.whisper.transcribe(
        audio,
        language="en",
        beam_size=1,
        temperature=0.0,
        vad_filter=False,
        condition_on_previous_text=False,
        without_timestamps=True,
    )
    return " ".join(s.text.strip() for s in segments)


def encoder_cost(models: AsrModels, utterances: list[Utterance]) -> tuple[float, float]:
    """Mean encoder time (ms) on the real length vs. the 30 s pad transcribe() uses."""
    actual, padded = [], []
    for u in utterances:
        features = models.whisper.feature_extractor(
            resample(u.audio, u.sample_rate, 16000), padding=0
        )
        full = np.zeros((features.shape[0], 3000), dtype=features.dtype)
        full[:, : min(3000, features.shape[1])] = features[:, :3000]
        for target, sink in ((features, actual), (full, padded)):
            started = time.perf_counter()
            models.whisper.encode(target)
            sink.append((time.perf_counter() - started) * 1000)
    return float(np.mean(actual)), float(np.mean(padded))


def corpus(settings: Settings, quick: bool) -> list[Utterance]:
    prompts = asterisk()
    if quick:
        prompts = prompts[:: max(1, len(prompts) // QUICK_ASTERISK)][:QUICK_ASTERISK]
    return librivox() + phone_call(settings.models.cache_dir / "data") + prompts


def _wer(references: list[str], hypotheses: list[str]) -> float:
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def evaluate(
    settings: Settings, quick: bool = False, paced: bool = True
) -> dict[str, object]:
    models = AsrModels(settings)
    utterances = corpus(settings, quick)
    replays = []
    for n, utterance in enumerate(utterances, 1):
        replays.append(await replay(models, utterance, paced))
        progress(n, len(utterances), utterance.id)
    offline = [offline_transcript(models, u) for u in utterances]
    references = [u.text for u in utterances]
    latencies = [(r.finals[-1][0] - r.true_end) * 1000 for r in replays if r.finals]
    intervals = [
        (b - a) * 1000 for r in replays for (a, _), (b, _) in itertools.pairwise(r.partials)
    ]
    audio_seconds = sum(u.seconds for u in utterances)
    encoder_actual, encoder_padded = encoder_cost(models, utterances[:10])
    by_source = {
        source: _wer(
            [u.text for u in utterances if u.source == source],
            [r.transcript for r in replays if r.utterance.source == source],
        )
        for source in sorted({u.source for u in utterances})
    }
    return {
        "wer": _wer(references, [r.transcript for r in replays]),
        "wer_offline": _wer(references, offline),
        "rtf": sum(r.decode_ms for r in replays) / 1000 / audio_seconds,
        "final_latency_ms_p50": _percentile(latencies, 50),
        "final_latency_ms_p90": _percentile(latencies, 90),
        "partial_interval_ms_p50": _percentile(intervals, 50),
        "partial_revision_rate": revision_rate(replays),
        "n_utterances": len(utterances),
        "audio_seconds": audio_seconds,
        "paced": paced,
        "model": settings.asr.model,
        "wer_by_source": by_source,
        "encoder_ms_real_length": encoder_actual,
        "encoder_ms_padded_30s": encoder_padded,
        "missing_finals": sum(1 for r in replays if not r.finals),
    }


def format_report(report: dict[str, object]) -> str:
    rows = [
        ("WER, streaming finals", f"{report['wer']:.3f}"),
        ("WER, offline (one call, same model)", f"{report['wer_offline']:.3f}"),
        ("real-time factor (decoder)", f"{report['rtf']:.3f}"),
        (
            "final latency P50 / P90 (ms)",
            f"{report['final_latency_ms_p50']:.0f} / {report['final_latency_ms_p90']:.0f}",
        ),
        ("partial interval P50 (ms)", f"{report['partial_interval_ms_p50']:.0f}"),
        ("partial revision rate", f"{report['partial_revision_rate']:.3f}"),
        (
            "encoder ms: real length / 30 s pad",
            f"{report['encoder_ms_real_length']:.1f} / {report['encoder_ms_padded_30s']:.1f}",
        ),
        ("utterances / audio seconds", f"{report['n_utterances']} / {report['audio_seconds']:.1f}"),
        ("paced in real time", str(report["paced"])),
    ]
    rows += [(f"WER {source}", f"{wer:.3f}") for source, wer in report["wer_by_source"].items()]  # type: ignore[union-attr]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(settings: Settings, quick: bool, fast: bool, json_path: Path | None) -> int:
    report = asyncio.run(evaluate(settings, quick=quick, paced=not fast))
    return publish(report, format_report(report), json_path)
