"""The offline replay that chooses end-of-turn thresholds on the tune split."""

import pytest

from eval.turn_tune import score, turn_ends
from voice.settings import TurnSettings

LINEAR = TurnSettings(audio_weight=0.5, min_silence_ms=100, max_silence_ms=1100, silence_curve=1)


def record(evidence, speech_starts, true_end, pause=None):
    return {
        "evidence": evidence,
        "speech_starts": speech_starts,
        "true_end": true_end,
        "pause": pause,
    }


def test_a_confident_pause_ends_at_its_deadline_unless_speech_resumes_first():
    # p = 0.9 -> 100 + 1000 * 0.1 = 200 ms after the silence began at 1.0 s.
    confident = [(1.1, 1.0, 0.9, 0.9)]
    assert turn_ends(record(confident, [], 1.0), LINEAR) == [pytest.approx(1.2)]
    assert turn_ends(record(confident, [1.15], 1.0), LINEAR) == []


def test_a_later_assessment_moves_the_deadline():
    # First p = 0.1 (1.0 s wait), then the final transcript at 1.3 s makes it 0.9 (200 ms).
    evidence = [(1.1, 1.0, 0.1, 0.1), (1.3, 1.0, 0.9, 0.9)]
    assert turn_ends(record(evidence, [], 1.0), LINEAR) == [pytest.approx(1.3)]


def test_score_counts_cut_offs_inside_mid_turn_pauses():
    cut = record([(1.1, 1.0, 0.9, 0.9), (3.1, 3.0, 0.9, 0.9)], [1.5], 3.0, pause=[1.0, 1.5])
    waited = record([(1.1, 1.0, 0.1, 0.1), (3.1, 3.0, 0.9, 0.9)], [1.5], 3.0, pause=[1.0, 1.5])
    latency, cutoffs = score([cut, waited], LINEAR)
    assert cutoffs == 0.5 and latency == pytest.approx(200)
