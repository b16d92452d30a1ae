"""The text end-of-turn model with its shipped weights, its data recipe and its evaluation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from eval.turn_text import evaluate_text
from turn.text_data import (
    HELDOUT_STOP,
    TOPICAL_DIR,
    VALIDATION_STOP,
    asr_style,
    cut_points,
    phrase_key,
    stop_phrases,
)
from turn.text_model import TextModelError, TextTurnModel


@pytest.fixture(scope="module")
def model() -> TextTurnModel:
    return TextTurnModel.load()


@pytest.mark.parametrize(
    "text",
    [
        "I really enjoyed that movie last night.",
        "What time does the store close?",
        "Do you like football?",
    ],
)
def test_complete_sentence_ends_the_turn(model, text):
    prediction = model.predict(text)
    assert prediction.intent == "end"
    assert prediction.p_complete >= model.threshold
    assert prediction.p_complete > 0.8


@pytest.mark.parametrize(
    "text", ["and then I", "I was going to the", "So I think that", "my favorite one is the"]
)
def test_unfinished_text_continues(model, text):
    prediction = model.predict(text)
    assert prediction.intent == "continue"
    assert prediction.p_complete < model.threshold


@pytest.mark.parametrize(
    "text", ["stop", "Stop.", "wait a second", "Wait a second.", "shh", "hold on", "Be quiet!"]
)
def test_stop_requests(model, text):
    assert model.predict(text).intent == "stop"


def test_ordinary_use_of_stop_words_is_not_a_stop(model):
    assert model.predict("I can't wait to see the new Star Wars movie.").intent == "end"


def test_last_assistant_turn_is_optional(model):
    with_context = model.predict("Yes, I do.", last_assistant="Do you like jazz?")
    assert with_context.intent == "end"
    assert model.predict("Yes, I do.", last_assistant="").intent == "end"


def test_probabilities_are_consistent(model):
    prediction = model.predict("I was thinking about")
    assert set(prediction.probabilities) == {"continue", "end", "stop"}
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.p_complete == pytest.approx(1.0 - prediction.probabilities["continue"])


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_an_unfinished_turn(model, text):
    prediction = model.predict(text)
    assert prediction.p_complete == 0.0
    assert prediction.intent == "continue"


def test_very_long_text_uses_its_tail(model):
    words = ("the match went on for a very long time and " * 500).split()
    assert len(words) == 5000
    long = model.predict(" ".join(words) + " everyone was tired.")
    assert long.intent == "end"
    unfinished = model.predict(" ".join(words))  # ends in "and"
    assert unfinished.intent == "continue"
    one_word = model.predict("x" * 100_000)  # nothing to cut at: still a prediction
    assert one_word.probabilities["continue"] < 1.0


@pytest.mark.parametrize(
    "text",
    ["これは日本語の文です。", "¿Dónde está la biblioteca?", "Привет, как дела", "😀😀😀", "..."],
)
def test_any_script_or_emoji_gives_a_prediction(model, text):
    prediction = model.predict(text, last_assistant="🙂")
    assert 0.0 <= prediction.p_complete <= 1.0
    assert prediction.intent in ("continue", "end", "stop")


def test_missing_weights_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nothing.npz"
    with pytest.raises(TextModelError, match=r"nothing\.npz") as error:
        TextTurnModel.load(missing)
    assert "python -m turn.train_text" in str(error.value)


def test_corrupt_weights_name_the_file_and_the_fix(tmp_path):
    corrupt = tmp_path / "broken.npz"
    corrupt.write_bytes(b"not a weights file")
    with pytest.raises(TextModelError, match=r"broken\.npz.*python -m turn\.train_text"):
        TextTurnModel.load(corrupt)


def test_shipped_weights_are_small():
    from turn.text_model import WEIGHTS_FILE

    assert WEIGHTS_FILE.stat().st_size < 2_000_000


def test_cuts_skip_sentence_ends():
    words = ["Yes,", "I", "do.", "I", "think", "they", "want", "to", "win!"]
    points = cut_points(words)
    assert 3 not in points  # "Yes, I do." may be the whole turn
    assert points == [1, 2, 4, 5, 6, 7, 8]


def test_cuts_skip_holds_and_text_without_words():
    words = ["-", "Hello", "there", "friend"]
    assert cut_points(words, frozenset({2})) == [3]


def test_asr_style_is_deterministic():
    text = "Well, I think so. Do you?"
    first = [asr_style(text, random.Random(7)) for _ in range(3)]
    again = [asr_style(text, random.Random(7)) for _ in range(3)]
    assert first == again
    styles = {asr_style(text, random.Random(seed)) for seed in range(50)}
    assert "well i think so do you" in styles and text in styles


def test_stop_wordings_for_validation_and_test_are_never_trained():
    trained = {phrase_key(p) for p in stop_phrases(random.Random(0), variants=40)}
    assert trained.isdisjoint(phrase_key(p) for p in HELDOUT_STOP)
    assert trained.isdisjoint(phrase_key(p) for p in VALIDATION_STOP)
    assert {phrase_key(p) for p in HELDOUT_STOP}.isdisjoint(phrase_key(p) for p in VALIDATION_STOP)


@pytest.mark.skipif(not Path(TOPICAL_DIR).is_dir(), reason="shared/data/topical-chat is absent")
def test_quick_evaluation_reports_the_four_keys():
    report = evaluate_text(quick=True)
    assert set(report) == {
        "text_accuracy_complete",
        "text_accuracy_incomplete",
        "text_accuracy_stop",
        "text_ms_per_decision",
    }
    assert report["text_accuracy_incomplete"] > 0.9
    assert report["text_accuracy_complete"] > 0.5
    assert report["text_accuracy_stop"] > 0.7
    assert report["text_ms_per_decision"] > 0.0
