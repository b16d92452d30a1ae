"""Choose the end-of-turn thresholds on the ``tune`` split, offline.

``relayvoice eval turn --split tune --json FILE`` records, for every pause, when each
P(complete) assessment arrived and when (if ever) speech resumed. Replaying those against
other settings shows which turn-ends and cut-offs they would have produced, without running
the models again. It approximates (a cut-off would also change the text seen later), so the
chosen settings are then measured for real on the ``eval`` split.

    python -m eval.turn_tune FILE
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from turn.detector import silence_needed
from voice.settings import TurnSettings

GRID = {
    "audio_weight": (0.3, 0.5, 0.7, 0.85),
    "min_silence_ms": (0, 50, 100, 200, 300, 400, 500),
    "max_silence_ms": (1000, 1500, 2000),
    "silence_curve": (1.0, 2.0, 3.0, 4.0),
}
MAX_LATENCY_MS = 400.0  # the onset budget; the evidence alone arrives ~200 ms into a pause


def turn_ends(record: dict, settings: TurnSettings) -> list[float]:
    """Stream times at which a detector with ``settings`` would have ended the turn."""
    w = settings.audio_weight
    ends = []
    evidence = sorted(record["evidence"], key=lambda e: (e[1], e[0]))
    for silence_start, group in itertools.groupby(evidence, key=lambda e: e[1]):
        updates = list(group)
        resume = min((t for t in record["speech_starts"] if t > silence_start), default=np.inf)
        for i, (at, _, p_audio, p_text) in enumerate(updates):
            deadline = silence_start + silence_needed(settings, w * p_audio + (1 - w) * p_text)
            fire = max(at, deadline)
            following = updates[i + 1][0] if i + 1 < len(updates) else np.inf
            if fire <= following:
                if fire < resume:
                    ends.append(fire)
                break
    return ends


def score(records: list[dict], settings: TurnSettings) -> tuple[float, float]:
    """(decision latency P50 in ms, false cut-off rate)."""
    latencies, cutoffs, paused = [], 0, 0
    for r in records:
        ends = turn_ends(r, settings)
        after = [t for t in ends if t >= r["true_end"]]
        if after:
            latencies.append((after[0] - r["true_end"]) * 1000)
        if r["pause"] is not None:
            paused += 1
            cutoffs += any(t < r["true_end"] for t in ends)
    return float(np.median(latencies)), cutoffs / max(paused, 1)


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    if report["split"] != "tune":
        sys.exit("tune on the tune split only: relayvoice eval turn --split tune --json FILE")
    records = report["scenarios"]
    results = []
    for values in itertools.product(*GRID.values()):
        settings = dataclasses.replace(TurnSettings(), **dict(zip(GRID, values, strict=True)))
        latency, cutoff = score(records, settings)
        results.append((cutoff, latency, dict(zip(GRID, values, strict=True))))
    fit = sorted((r for r in results if r[1] <= MAX_LATENCY_MS), key=lambda r: (r[0], r[1]))
    print(f"{'false cut-off':>13}  {'latency P50':>11}  settings")
    for cutoff, latency, values in fit[:10]:
        print(f"{cutoff:13.3f}  {latency:11.0f}  {values}")


if __name__ == "__main__":
    main()
