"""smart-turn v3.2: P(the speaker has finished) from the last 8 s of 16 kHz audio.

The ONNX file is carried by the pipecat-ai package; it is run here with onnxruntime directly
(no pipecat pipeline). Features are Whisper log-mels of the zero-mean, unit-variance
waveform, left-padded with silence to 8 s, as the model was trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from faster_whisper.feature_extractor import FeatureExtractor

from voice.audio import validate_samples
from voice.onnx import onnx_session

SAMPLE_RATE = 16000
WINDOW_SECONDS = 8
_WINDOW = SAMPLE_RATE * WINDOW_SECONDS


class SmartTurnModel:
    def __init__(self, model_file: Path, threads: int = 1) -> None:
        self._session = onnx_session(model_file, threads)
        self._features = FeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)

    def features(self, audio: np.ndarray) -> np.ndarray:
        audio = validate_samples(audio)[-_WINDOW:]
        window = np.zeros(_WINDOW, dtype=np.float32)
        if len(audio):
            window[-len(audio) :] = audio
        window = (window - window.mean()) / np.sqrt(window.var() + 1e-7)
        return self._features(window, padding=0)[:, : _WINDOW // 160].astype(np.float32)

    def p_complete(self, audio: np.ndarray) -> float:
        """Probability that the turn is complete, given the user's audio up to now."""
        (probability,) = self._session.run(None, {"input_features": self.features(audio)[None]})
        return float(probability[0, 0])
