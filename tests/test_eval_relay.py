"""The judge's answer to a RelayS2S score."""

import pytest

from eval.relay import rubric_score


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
