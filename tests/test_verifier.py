"""The verifier: its features, decision rule and training labels, on a hand-set model and fake
embeddings."""

from pathlib import Path

import numpy as np
import pytest

from llm.backend import Message, Token
from llm.relay import Draft
from llm.train_verifier import draft_label
from llm.verifier import Verifier, VerifierError, VerifierModel, signal_features


class Embedder:
    """Two fixed unit directions: the prefix either repeats the user's words or does not."""

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded += texts
        return np.stack([np.eye(3, dtype=np.float32)[0 if "football" in t else 1] for t in texts])


def draft(text: str, logprob: float = -0.2) -> Draft:
    tokens = tuple(Token(text=w, logprob=logprob, entropy=1.0, margin=2.0) for w in text.split())
    return Draft(transcript="Do you like football?", text=text, tokens=tokens)


def test_signal_features_summarise_the_drafters_confidence():
    features = signal_features(draft("Yes, I love", logprob=-0.5).tokens, "Yes, I love")
    assert features.tolist() == pytest.approx([-0.5, -0.5, 1.0, 1.0, 2.0, 3.0])
    assert signal_features((), "")[0] == -10.0  # no tokens: as unsure as it gets


async def test_accepts_above_the_threshold_only(tmp_path: Path):
    # Weight only the cosine of user words and prefix (feature 6 of 6 + 1 + 3).
    weights = np.zeros(10, np.float32)
    weights[6] = 4.0
    model = VerifierModel(weights, -2.0, np.zeros(10), np.ones(10), threshold=0.5)
    model.save(tmp_path / "v.npz")
    verifier = Verifier(VerifierModel.load(tmp_path / "v.npz"), Embedder())  # type: ignore[arg-type]
    history = [Message(role="system", content="be brief")]
    on_topic, off_topic = draft("I love football"), draft("The weather is nice")
    assert verifier.score(history, on_topic) == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert await verifier.accept(history, on_topic)
    assert not await verifier.accept(history, off_topic)


async def test_the_users_words_are_embedded_once_ahead_of_the_draft():
    embedder = Embedder()
    model = VerifierModel(np.zeros(10, np.float32), 0.0, np.zeros(10), np.ones(10), 0.5)
    verifier = Verifier(model, embedder)  # type: ignore[arg-type]
    history = [Message(role="system", content="be brief")]
    await verifier.read(history, "Do you like football?")
    assert embedder.embedded == ["Do you like football?"]
    await verifier.accept(history, draft("I love football"))
    await verifier.accept(history, draft("The weather is nice"))
    assert embedder.embedded[1:] == ["I love football", "The weather is nice"]


def test_missing_or_broken_weights_name_the_script(tmp_path: Path):
    with pytest.raises(VerifierError, match=r"python -m llm\.train_verifier"):
        VerifierModel.load(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(VerifierError, match="unreadable"):
        VerifierModel.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("rating", "prefix", "rest", "label"),
    [
        (5, "That's a good point,", " the Patriots won it twice.", 1),
        (3, "That's a good point,", " the Patriots won it twice.", 0),  # the judge said no
        (5, "I'm sorry,", " but I can't assist with that.", 0),  # a refusal follows
        (5, "No, no,", " I don't know that.", 0),
        (5, "I'm sorry to hear that,", " I hope your team does better.", 1),  # no refusal
    ],
)
def test_a_draft_is_good_when_rated_so_and_its_reply_answers(rating, prefix, rest, label):
    assert draft_label(rating, prefix, rest) == label
