"""Piper voices over onnxruntime with the project's thread budget."""

from __future__ import annotations

import json
from pathlib import Path

from piper import PiperVoice
from piper.config import PiperConfig

from voice.onnx import onnx_session


def load_piper(model_file: Path, threads: int) -> PiperVoice:
    config = json.loads(Path(f"{model_file}.json").read_text(encoding="utf-8"))
    return PiperVoice(
        config=PiperConfig.from_dict(config), session=onnx_session(model_file, threads)
    )
