"""The judge's answer to a RelayS2S score."""

import pytest

from eval.relay import Reply, reply_record, rubric_score


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("relevant: yes\nhelpful: yes\naccurate: yes\nclear: yes", 5),
        ("Relevant: Yes\nHelpful: No\nAccurate: yes\nClear: yes", 4),
        ("relevant: yes\nhelpful: yes\naccurate: no\nclear: yes", 3),  # made up: at most 3
        ("relevant: no\nhelpful: no\naccurate: yes\nclear: no", 2),
        ("relevant: yes\nhelpful: yes", 3),  # unanswered points count as no
        ("I think it is great!", 1),
    ],
)
def test_four_yes_no_points_make_a_one_to_five_score(answer, score):
    assert rubric_score(answer) == score


def test_each_reply_in_the_json_carries_its_timings_when_it_had_a_prefix():
    kept = Reply("relay", "Sure, it is.", 12.34, 250.0, None, 1, 5)
    assert reply_record(kept) == {
        "text": "Sure, it is.",
        "score": 5,
        "prefix_words": 1,
        "prefix_ms": 12.3,
        "first_continuation_ms": 250.0,
        "clause_ms": None,  # the continuation never finished a clause
    }
    assert reply_record(Reply("cascaded", "It is.", score=4)) == {"text": "It is.", "score": 4}
