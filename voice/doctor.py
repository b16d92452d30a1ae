"""`relayvoice doctor`: load every model for real, run one tiny inference on each, report.

A row is ok only when the file matches its published SHA-256 (re-hashed, not remembered),
the model loads, and the inference returns something sensible.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from voice.audio import read_wav, resample
from voice.models import REGISTRY, ModelError, resolve
from voice.settings import Settings

SPEECH_WAV = Path(
    "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav"
)
SPEECH_SECONDS = (0.2, 1.2)  # one second of real speech: "he was not an..."


@dataclass
class DoctorRow:
    role: str
    package: str
    file: str
    hash_ok: bool
    ok: bool
    load_ms: float | None
    infer_ms: float | None
    result: str  # what the inference produced, or the error


Probe = Callable[[Path, Settings, np.ndarray], tuple[object, Callable[[], str]]]


def speech_sample() -> np.ndarray:
    """One second of real speech at 16 kHz (Debian's pocketsphinx-testdata)."""
    if not SPEECH_WAV.is_file():
        raise ModelError(
            f"test speech {SPEECH_WAV} is missing: install the Debian package "
            "pocketsphinx-testdata (`make setup` does)"
        )
    samples, rate = read_wav(SPEECH_WAV)
    samples = resample(samples, rate, 16000)
    start, end = (int(s * 16000) for s in SPEECH_SECONDS)
    return samples[start:end]


def _asr(path: Path, settings: Settings, speech: np.ndarray) -> tuple[object, Callable[[], str]]:
    from asr.whisper import load_whisper

    model = load_whisper(path, settings.asr.threads)

    def infer() -> str:
        segments, _ = model.transcribe(speech, language="en", beam_size=1, vad_filter=False)
        return repr(" ".join(s.text.strip() for s in segments))

    return model, infer


def _vad(path: Path, settings: Settings, speech: np.ndarray) -> tuple[object, Callable[[], str]]:
    from asr.vad import WINDOW, SileroVad

    vad = SileroVad(path)

    def infer() -> str:
        vad.reset()
        probs = [
            vad.probability(speech[i : i + WINDOW])
            for i in range(0, len(speech) - WINDOW + 1, WINDOW)
        ]
        return f"max P(speech) {max(probs):.2f} over {len(probs)} windows"

    return vad, infer


def _turn_audio(
    path: Path, settings: Settings, speech: np.ndarray
) -> tuple[object, Callable[[], str]]:
    from turn.smart_turn import SmartTurnModel

    model = SmartTurnModel(path, settings.turn.audio_model_threads)
    return model, lambda: f"P(complete) {model.p_complete(speech):.2f} (cut mid-sentence)"


def _llm(threads: Callable[[Settings], int]) -> Probe:
    def probe(
        path: Path, settings: Settings, speech: np.ndarray
    ) -> tuple[object, Callable[[], str]]:
        from llm.llama import load_llama

        model = load_llama(path, threads(settings), settings.llm.context_tokens)

        def infer() -> str:
            out = model.create_chat_completion(
                messages=[{"role": "user", "content": "Say hello."}], max_tokens=1, temperature=0.0
            )
            return f"first token {out['choices'][0]['message']['content']!r}"

        return model, infer

    return probe


def _tts(path: Path, settings: Settings, speech: np.ndarray) -> tuple[object, Callable[[], str]]:
    from tts.piper import load_piper

    voice = load_piper(path, settings.tts.threads)

    def infer() -> str:
        chunks = list(voice.synthesize("Hello."))
        seconds = sum(len(c.audio_float_array) for c in chunks) / chunks[0].sample_rate
        return f"{seconds:.2f} s of audio at {chunks[0].sample_rate} Hz"

    return voice, infer


def _embedding(
    path: Path, settings: Settings, speech: np.ndarray
) -> tuple[object, Callable[[], str]]:
    from voice.embedding import TextEmbedder

    embedder = TextEmbedder(path, settings.embedding.threads)

    def infer() -> str:
        vectors = embedder.embed(["hello there", "hi, how are you?"])
        return f"dim {vectors.shape[1]}, cosine(hello, hi) {float(vectors[0] @ vectors[1]):.2f}"

    return embedder, infer


PROBES: dict[str, Probe] = {
    "asr": _asr,
    "asr-accurate": _asr,
    "vad": _vad,
    "turn-audio": _turn_audio,
    "draft-llm": _llm(lambda s: s.llm.draft_threads),
    "small-llm": _llm(lambda s: s.llm.draft_threads),
    "slow-llm": _llm(lambda s: s.llm.slow_threads),
    "tts-voice": _tts,
    "embedding": _embedding,
}


def check_role(role: str, settings: Settings, speech: np.ndarray) -> DoctorRow:
    spec = REGISTRY[role]
    row = DoctorRow(role, spec.package, "", False, False, None, None, "")
    try:
        resolved = resolve(role, settings, rehash=True)
        row.file, row.hash_ok = str(resolved.path), resolved.hash_checked
        started = time.perf_counter()
        model, infer = PROBES[role](resolved.path, settings, speech)
        row.load_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        row.result = infer()
        row.infer_ms = (time.perf_counter() - started) * 1000
        row.ok = True
        del model, infer
    except Exception as exc:  # any failure becomes a red row, the rest still runs
        row.result = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModelError) else str(exc)
    gc.collect()
    return row


def run_doctor(settings: Settings, roles: Iterable[str] | None = None) -> list[DoctorRow]:
    speech = speech_sample()
    return [check_role(role, settings, speech) for role in (roles or REGISTRY)]


def format_table(rows: list[DoctorRow]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    header = ("role", "status", "package", "hash", "load ms", "infer ms", "file / result")
    lines = [header]
    for r in rows:
        status = "ok" if r.ok else "FAIL"
        hash_state = "ok" if r.hash_ok else ("user file" if r.ok else "-")
        lines.append(
            (r.role, status, r.package, hash_state, ms(r.load_ms), ms(r.infer_ms), r.file or "-")
        )
        lines.append(("", "", "", "", "", "", f"  {r.result}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    )


def as_json(rows: list[DoctorRow]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
