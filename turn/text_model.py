"""Text end-of-turn and intent: P(turn complete) and continue / end / stop from a transcript.

A multinomial logistic regression over hashed features of the transcript's tail: its words, the
last one to three words by position, suffixes and char n-grams of the last words, trailing
punctuation, casing and length, plus a little about the assistant's last turn. Inference is
pure numpy (a few dozen row look-ups), well under a millisecond on one core. The weights and the
decision thresholds live in ``text_turn.npz`` beside this module; ``python -m turn.train_text``
rebuilds it.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Intent = Literal["continue", "end", "stop"]
INTENTS: tuple[Intent, ...] = ("continue", "end", "stop")
WEIGHTS_FILE = Path(__file__).with_name("text_turn.npz")
FORMAT_VERSION = 1

# Only the tail decides whether a turn is over; the cap keeps long transcripts as cheap as short.
MAX_CHARS = 300
TAIL_TOKENS = 16
SHORT_WORDS = 6  # texts up to this long also get a whole-text feature (stop phrases, "yes.")

# Conjunctions, prepositions, fillers, pronouns and auxiliaries: a turn seldom ends on one, and
# one shared feature lets rare ones borrow from common ones.
CONTINUATION_WORDS = frozenset(
    ("a", "an", "the", "and", "but", "or", "so", "because", "cause", "if", "when", "while",
     "though", "although", "that", "which", "who", "whose", "to", "of", "in", "on", "at", "for",
     "from", "with", "by", "about", "into", "onto", "than", "as", "like", "my", "your", "his",
     "her", "their", "our", "its", "um", "uh", "er", "erm", "hmm", "well", "then", "also", "is",
     "are", "was", "were", "am", "be", "been", "being", "i", "you", "he", "she", "we", "they",
     "it", "this", "these", "those", "some", "any", "very", "really", "just", "gonna", "wanna",
     "can", "could", "would", "should", "will", "might", "must", "do", "does", "did", "have",
     "has", "had", "not", "no", "more", "most", "such", "what", "where", "how", "why", "there")
)  # fmt: skip

# A word: letters/digits with inner apostrophes ("don't"); anything else is a one-char token.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]")
_SENTENCE_END = frozenset(".?!…")


@dataclass(frozen=True)
class TextTurnPrediction:
    p_complete: float  # 1 - P(continue)
    intent: Intent
    probabilities: dict[str, float]


class TextModelError(RuntimeError):
    """The weights file is missing or unreadable."""


def _length_bucket(n: int) -> str:
    for limit, name in ((1, "1"), (2, "2"), (3, "3"), (5, "4-5"), (8, "6-8"), (12, "9-12")):
        if n <= limit:
            return name
    return "13+" if n <= 20 else "21+"


def _trail_kind(token: str) -> str:
    if token[0].isalnum():
        return "none"
    if token in _SENTENCE_END:
        return "." if token == "…" else token
    return token if token in ",;:-" else "p"


def feature_strings(text: str, last_assistant: str | None = None) -> list[str]:
    """The named features of one decision; hashed into weight rows by ``feature_indices``."""
    truncated = len(text) > MAX_CHARS
    tokens = _TOKEN.findall(text[-MAX_CHARS:].replace("’", "'"))
    if truncated and len(tokens) > 1:
        tokens = tokens[1:]  # the first one may be cut mid-word
    if not tokens:
        return []
    lower = [t.lower() for t in tokens[-TAIL_TOKENS:]]
    words = [t for t in lower if t[0].isalnum()]
    all_words = sum(1 for t in tokens if t[0].isalnum())
    trail = _trail_kind(lower[-1])
    inner_punct = any(not t[0].isalnum() for t in lower[:-1])
    cased = any(c.isupper() for t in tokens[-TAIL_TOKENS:] for c in t)
    size = _length_bucket(all_words)
    # ASR style (punctuated or not, cased or not) changes what the other cues mean.
    style = f"{trail}|{int(inner_punct)}|{int(cased)}"
    feats = [f"t={trail}", f"s={style}", f"n={size}", f"tn={trail}|{size}", f"sn={style}|{size}"]
    feats += [f"u={t}" for t in lower]
    if words:
        w1 = words[-1]
        feats += [f"w1={w1}", f"tw1={trail}|{w1}", f"pw1={int(inner_punct)}|{w1}"]
        feats.append(f"cj={trail}|{w1 in CONTINUATION_WORDS}")
        if len(words) > 1:
            feats += [f"w2={words[-2]} {w1}", f"tw2={trail}|{words[-2]} {w1}"]
        if len(words) > 2:
            feats.append(f"w3={' '.join(words[-3:])}")
        feats += [f"x{k}={w1[-k:]}" for k in range(1, min(4, len(w1)) + 1)]
        # Char n-grams of the last two words: typos, "shhh", unseen inflections.
        tail = f" {' '.join(words[-2:])} "
        feats += [f"c={tail[i : i + 3]}" for i in range(len(tail) - 2)]
        if all_words <= SHORT_WORDS:
            feats.append(f"F={' '.join(words)}")
    if last_assistant is None or not last_assistant.strip():
        asked = "none"
    else:
        asked = "q" if last_assistant.rstrip().endswith("?") else "s"
    feats += [f"a={asked}", f"an={asked}|{size}", f"at={asked}|{trail}"]
    return feats


def feature_indices(features: list[str], dim: int) -> np.ndarray:
    """Stable hashing (crc32, not Python's salted hash) so training and inference agree."""
    mask = dim - 1
    return np.fromiter(
        (zlib.crc32(f.encode("utf-8", "surrogatepass")) & mask for f in features),
        dtype=np.int64,
        count=len(features),
    )


class TextTurnModel:
    def __init__(
        self, weights: np.ndarray, bias: np.ndarray, threshold: float, stop_threshold: float
    ) -> None:
        dim = weights.shape[0]
        if weights.ndim != 2 or weights.shape[1] != len(INTENTS) or dim & (dim - 1):
            raise ValueError(f"weights must be (2**k, {len(INTENTS)}), got {weights.shape}")
        self._weights = weights.astype(np.float32)
        self._bias = bias.astype(np.float32)
        self.dim = dim
        self.threshold = float(threshold)
        self.stop_threshold = float(stop_threshold)

    @classmethod
    def load(cls, path: Path | None = None) -> TextTurnModel:
        path = path or WEIGHTS_FILE
        hint = "rebuild it with `python -m turn.train_text`"
        if not path.is_file():
            raise TextModelError(f"text end-of-turn weights {path} are missing: {hint}")
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["version"]) != FORMAT_VERSION:
                    raise ValueError(f"format version {int(data['version'])} != {FORMAT_VERSION}")
                return cls(
                    data["weights"],
                    data["bias"],
                    float(data["threshold"]),
                    float(data["stop_threshold"]),
                )
        except Exception as error:  # any unreadable file gets the same actionable message
            message = f"text end-of-turn weights {path} are corrupt ({error}): {hint}"
            raise TextModelError(message) from error

    def probabilities(self, text: str, last_assistant: str | None = None) -> np.ndarray | None:
        """Softmax over INTENTS, or None when the text holds no token at all."""
        features = feature_strings(text, last_assistant)
        if not features:
            return None
        scores = self._weights[feature_indices(features, self.dim)].sum(axis=0) + self._bias
        scores = np.exp(scores - scores.max())
        return scores / scores.sum()

    def predict(self, text: str, last_assistant: str | None = None) -> TextTurnPrediction:
        probs = self.probabilities(text, last_assistant)
        if probs is None:  # nothing said yet: never a finished turn
            return TextTurnPrediction(0.0, "continue", {"continue": 1.0, "end": 0.0, "stop": 0.0})
        p_complete = 1.0 - float(probs[0])
        intent: Intent
        if probs[2] >= self.stop_threshold:
            intent = "stop"
        elif p_complete >= self.threshold:
            intent = "end"
        else:
            intent = "continue"
        named = {name: float(p) for name, p in zip(INTENTS, probs, strict=True)}
        return TextTurnPrediction(p_complete, intent, named)
