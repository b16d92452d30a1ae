"""The dialogue corpora the learned parts train on and are reported on.

Topical-Chat lives beside the checkout (``../shared/data/topical-chat``): ``valid_freq`` is
the only file anything learns or tunes from; ``test_freq`` (and its read-aloud
``test_freq_audio``) is for reports only.
"""

from __future__ import annotations

import json
from pathlib import Path

TOPICAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "topical-chat"


class CorpusMissing(RuntimeError):
    pass


def topical_chat(name: str, folder: Path = TOPICAL_DIR) -> dict[str, list[dict[str, str]]]:
    """Conversation id -> its turns in order, each with ``message`` (and, in
    ``test_freq_audio``, the two recognisers' outputs), sorted by id."""
    path = folder / f"{name}.json"
    if not path.is_file():
        raise CorpusMissing(f"{path} is missing (shared/data/topical-chat beside the checkout)")
    return {cid: conv["content"] for cid, conv in sorted(json.loads(path.read_text()).items())}
