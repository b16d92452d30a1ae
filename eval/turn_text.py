"""The text end-of-turn model on held-out data: Topical-Chat test_freq and held-out stop phrases.

test_freq gets the training recipe (turn/text_data.py): every turn whole, plus the same turn cut
once at a word boundary (never right after . ? !), both in the same ASR-style mix, with the
previous message as the assistant's last turn. Nothing here is used to fit or tune the model.

- text_accuracy_complete: whole turns with p_complete >= threshold and an intent other than
  "continue"
- text_accuracy_incomplete: cut turns with intent "continue"
- text_accuracy_stop: held-out stop phrases with intent "stop"
- text_ms_per_decision: mean wall time of one ``predict`` (numpy does no threading for it)
"""

from __future__ import annotations

import argparse
import json
import time

from turn.text_data import (
    CONTINUE,
    END,
    STOP,
    Example,
    heldout_stop_examples,
    heldout_turn_examples,
)
from turn.text_model import TextTurnModel, TextTurnPrediction

QUICK_CONVERSATIONS = 60  # of ~540: a deterministic subset that runs in a few seconds


def _correct(model: TextTurnModel, example: Example, prediction: TextTurnPrediction) -> bool:
    if example.label == END:
        return prediction.p_complete >= model.threshold and prediction.intent != "continue"
    if example.label == CONTINUE:
        return prediction.intent == "continue"
    return prediction.intent == "stop"


def score(model: TextTurnModel, examples: list[Example]) -> dict[str, float]:
    """The four report keys for ``examples`` (turns and stop phrases together)."""
    hits = {CONTINUE: 0, END: 0, STOP: 0}
    counts = {CONTINUE: 0, END: 0, STOP: 0}
    elapsed = 0.0
    for example in examples:
        start = time.perf_counter()
        prediction = model.predict(example.text, example.last_assistant)
        elapsed += time.perf_counter() - start
        counts[example.label] += 1
        hits[example.label] += _correct(model, example, prediction)
    return {
        "text_accuracy_complete": hits[END] / max(1, counts[END]),
        "text_accuracy_incomplete": hits[CONTINUE] / max(1, counts[CONTINUE]),
        "text_accuracy_stop": hits[STOP] / max(1, counts[STOP]),
        "text_ms_per_decision": 1000 * elapsed / max(1, len(examples)),
    }


def evaluate_text(quick: bool = False) -> dict[str, float]:
    model = TextTurnModel.load()
    turns = heldout_turn_examples(limit=QUICK_CONVERSATIONS if quick else None)
    return score(model, turns + heldout_stop_examples())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a deterministic subset")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_text(quick=args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
