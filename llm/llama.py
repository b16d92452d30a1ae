"""The embedded llama.cpp backend (llama-cpp-python), loaded from a verified GGUF file."""

from __future__ import annotations

from pathlib import Path

from llama_cpp import Llama


def load_llama(model_file: Path, threads: int, context_tokens: int) -> Llama:
    return Llama(
        model_path=str(model_file),
        n_ctx=context_tokens,
        n_threads=max(1, threads),
        n_threads_batch=max(1, threads),
        verbose=False,
    )
