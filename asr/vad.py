"""Voice activity: Silero VAD v6 over onnxruntime (no torch), with WebRTC's VAD as a pre-gate.

Input at any supported rate is resampled once to 16 kHz and cut into Silero's 32 ms windows.
While nobody speaks, WebRTC's GMM VAD (microseconds per frame) decides whether Silero needs
to look at all; once speech is under way every window goes to Silero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webrtcvad

from voice.audio import Framer, StreamResampler, float32_to_pcm16, validate_samples
from voice.onnx import onnx_session
from voice.settings import VadSettings

SAMPLE_RATE = 16000
WINDOW = 512  # samples per Silero call at 16 kHz (32 ms), fixed by the model
WINDOW_SECONDS = WINDOW / SAMPLE_RATE
_CONTEXT = 64  # the model expects the previous window's last 64 samples in front
_WEBRTC_SAMPLES = 480  # WebRTC takes 10, 20 or 30 ms frames: the first 30 ms of each window
_GATE_BELOW = 0.1  # Silero's last P(speech) must be under this for WebRTC to skip a window
_QUIET_TAIL = WINDOW // 2  # the window's newest samples that must be quiet for ``quiet``


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2)))


class SileroVad:
    """Stateful: windows must be fed in stream order; ``reset`` starts a new stream.
    Streams share the ONNX session through ``fork``; each keeps its own state."""

    def __init__(self, model_file: Path | None, threads: int = 1, session: object = None) -> None:
        self._session = session or onnx_session(model_file, threads)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def fork(self) -> SileroVad:
        """A detector for another stream, sharing the loaded model."""
        return SileroVad(None, session=self._session)

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, _CONTEXT), dtype=np.float32)

    def probability(self, window: np.ndarray) -> float:
        """P(speech) for the next ``WINDOW`` samples of 16 kHz audio."""
        window = validate_samples(window)
        if len(window) != WINDOW:
            raise ValueError(f"Silero VAD takes {WINDOW} samples at 16 kHz, got {len(window)}")
        x = np.concatenate([self._context, window[None, :]], axis=1)
        out, self._state = self._session.run(
            None, {"input": x, "state": self._state, "sr": self._sr}
        )
        self._context = x[:, -_CONTEXT:]
        return float(out[0, 0])


@dataclass(frozen=True, slots=True)
class VadWindow:
    """One 32 ms window at 16 kHz and what the detector concluded after it."""

    samples: np.ndarray
    start: float  # seconds since the stream began
    probability: float
    speaking: bool  # state after this window
    started: bool = False  # speech-started fires with this window
    ended: bool = False  # speech-ended fires with this window
    paused: bool = False  # first silent window inside speech: the end may be near
    quiet: bool = False  # inside speech, its energy fell far below the segment's loudest
    speech_time: float = 0.0  # with started: where speech began; with ended: where it stopped


class VoiceActivityDetector:
    """Turns a stream of audio chunks into VAD windows with speech start/end decisions."""

    def __init__(self, model: SileroVad, settings: VadSettings, input_rate: int) -> None:
        self._model = model
        self._settings = settings
        self._resampler = StreamResampler(input_rate, SAMPLE_RATE)
        self._framer = Framer(WINDOW)
        self._gate = webrtcvad.Vad(settings.webrtc_mode) if settings.webrtc_mode >= 0 else None
        self._start_windows = max(1, round(settings.start_ms / 1000 / WINDOW_SECONDS))
        self._end_windows = max(1, round(settings.hangover_ms / 1000 / WINDOW_SECONDS))
        self.input_rate = input_rate
        self._windows = 0
        self.reset()

    def reset(self) -> None:
        """Forget speech state (not the stream position)."""
        self._model.reset()
        self._last_probability = 0.0
        self.gated_windows = 0
        self.speaking = False
        self._speech_run = 0
        self._silence_run = 0
        self._loudest = 0.0  # RMS of the loudest window of the current speech segment

    @property
    def stream_time(self) -> float:
        """Seconds of 16 kHz audio consumed so far."""
        return self._windows * WINDOW_SECONDS

    def process(self, samples: np.ndarray) -> list[VadWindow]:
        samples = validate_samples(samples)
        return [self._window(w) for w in self._framer.push(self._resampler.process(samples))]

    def _gated_out(self, window: np.ndarray) -> bool:
        """Skip Silero only while it is sure nobody speaks and WebRTC hears nothing either.
        WebRTC misses quiet onsets (phone speech), so it never gates on its own."""
        if self._gate is None or self.speaking or self._last_probability >= _GATE_BELOW:
            return False
        return not self._gate.is_speech(float32_to_pcm16(window[:_WEBRTC_SAMPLES]), SAMPLE_RATE)

    def _quiet(self, window: np.ndarray) -> bool:
        """Inside speech: whether the window ends far quieter than the segment's loudest,
        which Silero only notices ~100 ms later."""
        ratio = self._settings.quiet_ratio
        if ratio <= 0:
            return False
        self._loudest = max(self._loudest, _rms(window))
        return _rms(window[-_QUIET_TAIL:]) < ratio * self._loudest

    def _window(self, window: np.ndarray) -> VadWindow:
        start = self.stream_time
        self._windows += 1
        if self._gated_out(window):
            probability = 0.0
            self.gated_windows += 1
        else:
            probability = self._model.probability(window)
        self._last_probability = probability
        s = self._settings
        if not self.speaking:
            self._speech_run = self._speech_run + 1 if probability >= s.threshold else 0
            if self._speech_run >= self._start_windows:
                self.speaking, self._silence_run, self._loudest = True, 0, _rms(window)
                began = start - (self._start_windows - 1) * WINDOW_SECONDS
                return VadWindow(window, start, probability, True, started=True, speech_time=began)
            return VadWindow(window, start, probability, False)
        quiet = self._quiet(window)
        if probability >= s.threshold:
            self._silence_run = 0
            return VadWindow(window, start, probability, True, quiet=quiet)
        if probability < s.release_threshold or self._silence_run:
            self._silence_run += 1
        paused = self._silence_run == 1
        if self._silence_run >= self._end_windows:
            self.speaking, self._speech_run = False, 0
            stopped = start - (self._end_windows - 1) * WINDOW_SECONDS
            return VadWindow(
                window,
                start,
                probability,
                False,
                ended=True,
                paused=paused,
                quiet=quiet,
                speech_time=stopped,
            )
        return VadWindow(window, start, probability, True, paused=paused, quiet=quiet)
