"""Silero VAD v6 over onnxruntime (no torch): speech probability per 32 ms window at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voice.audio import validate_samples
from voice.onnx import onnx_session

SAMPLE_RATE = 16000
WINDOW = 512  # samples per call at 16 kHz (32 ms), fixed by the model
_CONTEXT = 64  # the model expects the previous window's last 64 samples in front


class SileroVad:
    """Stateful: windows must be fed in stream order; ``reset`` starts a new stream."""

    def __init__(self, model_file: Path, threads: int = 1) -> None:
        self._session = onnx_session(model_file, threads)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

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
