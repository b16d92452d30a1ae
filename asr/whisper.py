"""Loading Whisper (CTranslate2) through faster-whisper, from a verified local directory."""

from __future__ import annotations

from pathlib import Path

from faster_whisper import WhisperModel


def load_whisper(model_file: Path, threads: int) -> WhisperModel:
    """``model_file`` is the verified ``model.bin``; its directory holds config and tokenizer."""
    return WhisperModel(
        str(model_file.parent),
        device="cpu",
        compute_type="int8",
        cpu_threads=max(1, threads),
        local_files_only=True,
    )
