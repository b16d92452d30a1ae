"""Whisper (CTranslate2, via faster-whisper) decoding of one bounded audio window.

faster-whisper's ``transcribe`` pads every call to 30 s, which costs ~190 ms of encoder time
even for half a second of audio. Here the encoder runs on the window's real length (plus a
short silence pad), the committed words inside the window are forced as a decoder prefix so
only new words are generated, and the decoded length is capped by the audio's duration so a
confused decoder cannot loop for hundreds of tokens.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import merge_punctuations

from asr.agreement import drop_repeats, trim_echo
from voice.events import Word
from voice.settings import AsrSettings

SAMPLE_RATE = 16000
_PREPEND_PUNCTUATION = "\"'“¿([{-"
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
_MAX_PROMPT_TOKENS = 100
_PAD_TOLERANCE_S = 0.02
_MAX_COMPRESSION_RATIO = 2.4  # above this the text is a loop, not speech (Whisper's own rule)


REPLICAS = 2  # copies of the model in memory: decodes that can run side by side


def load_whisper(model_file: Path, threads: int) -> WhisperModel:
    """``model_file`` is the verified ``model.bin``; its directory holds config and tokenizer.
    ``REPLICAS`` replicas, so that a final and a partial (or two streams) decode side by side
    rather than queue inside CTranslate2; each uses ``threads``."""
    return WhisperModel(
        str(model_file.parent),
        device="cpu",
        compute_type="int8",
        cpu_threads=max(1, threads),
        num_workers=REPLICAS,
        local_files_only=True,
    )


@dataclass(frozen=True)
class DecodeRequest:
    """One window of 16 kHz audio to decode, with what is already known about it."""

    audio: np.ndarray
    offset: float  # stream time (s) of the window's first sample
    context: str = ""  # transcript before the window: the decoder's prompt
    prefix: tuple[Word, ...] = ()  # committed words inside the window: forced, not generated

    @property
    def end(self) -> float:
        return self.offset + len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Hypothesis:
    words: list[Word]  # the new words after the prefix, stream times
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    compute_ms: float = 0.0
    rejected: str = ""  # why the decoder's output was thrown away, if it was


class WhisperDecoder:
    def __init__(self, model: WhisperModel, settings: AsrSettings) -> None:
        self._model = model
        self._settings = settings
        self._tokenizer = Tokenizer(
            model.hf_tokenizer,
            model.model.is_multilingual,
            task="transcribe",
            language=settings.language if model.model.is_multilingual else "en",
        )
        self._pad = np.zeros(int(settings.tail_pad_ms * SAMPLE_RATE / 1000), dtype=np.float32)

    def decode(self, request: DecodeRequest) -> Hypothesis:
        started = time.perf_counter()
        hypothesis = self._decode(request)
        return replace(hypothesis, compute_ms=(time.perf_counter() - started) * 1000)

    def _decode(self, request: DecodeRequest) -> Hypothesis:
        if len(request.audio) == 0:
            return Hypothesis([])
        s, tok = self._settings, self._tokenizer
        features = self._model.feature_extractor(
            np.concatenate([request.audio, self._pad]), padding=0
        )
        encoded = self._model.encode(features)
        context = (
            tok.encode(" " + request.context.strip())[-_MAX_PROMPT_TOKENS:]
            if request.context.strip()
            else []
        )
        prefix_text = "".join(w.text for w in request.prefix).strip()
        prompt = self._model.get_prompt(
            tok, context, without_timestamps=True, prefix=prefix_text or None
        )
        # Only the audio after the committed words needs new tokens.
        known = request.prefix[-1].end if request.prefix else request.offset
        seconds = max(0.0, request.end - known)
        budget = math.ceil(seconds * s.max_tokens_per_second) + 3
        (result,) = self._model.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            # CTranslate2 counts forced prefix tokens twice against max_length (measured).
            max_length=len(prompt) + 2 * budget,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=not prefix_text,
            suppress_tokens=[-1],
        )
        # The result repeats the forced prefix tokens before the generated ones.
        tokens = [t for t in result.sequences_ids[0] if t < tok.eot]
        prefix_tokens = tok.encode(" " + prefix_text) if prefix_text else []
        new_tokens = tokens[len(prefix_tokens) : len(prefix_tokens) + budget]
        avg_logprob = float(result.scores[0]) if result.scores else 0.0
        no_speech = float(result.no_speech_prob)
        text = tok.decode(new_tokens).strip()
        if no_speech > s.no_speech_threshold and avg_logprob < s.logprob_threshold:
            return Hypothesis([], no_speech, avg_logprob, rejected="no speech")
        if not text:
            return Hypothesis([], no_speech, avg_logprob)
        words = self._align(prefix_tokens + new_tokens, encoded, features.shape[-1], request.offset)
        new_words = words[len(request.prefix) :] if len(words) >= len(request.prefix) else words
        # Words placed in the silence pad were not spoken: Whisper starting over at the end.
        # Cut them before the loop test, or a sentence said once and restarted in the pad
        # would be thrown away whole.
        spoken = [w for w in new_words if w.start < request.end - _PAD_TOLERANCE_S]
        said = "".join(w.text for w in spoken).strip()
        if len(said) > 20 and _compression_ratio(said) > _MAX_COMPRESSION_RATIO:
            return Hypothesis([], no_speech, avg_logprob, rejected="repetition loop")
        return Hypothesis(drop_repeats(trim_echo(request.prefix, spoken)), no_speech, avg_logprob)

    def _align(self, tokens: list[int], encoded: object, frames: int, offset: float) -> list[Word]:
        if not tokens:
            return []
        (aligned,) = self._model.find_alignment(self._tokenizer, [tokens], encoded, frames)
        merge_punctuations(aligned, _PREPEND_PUNCTUATION, _APPEND_PUNCTUATION)
        return [
            Word(
                text=w["word"],
                start=offset + float(w["start"]),
                end=offset + float(w["end"]),
                probability=float(w["probability"]),
            )
            for w in aligned
            if w["word"].strip()
        ]


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))
