"""What every benchmark does with its results: a progress line, a table, a JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def progress(n: int, total: int, label: str, width: int = 24) -> None:
    """A progress bar on one stderr line rewritten in place; a newline after the last item."""
    bar = "#" * round(width * n / total)
    print(
        f"\r[{bar:{width}s}] {n}/{total} {label[:60]:60s}",
        end="\n" if n == total else "",
        file=sys.stderr,
    )
    sys.stderr.flush()


def publish(report: dict[str, object], table: str, json_path: Path | None) -> int:
    print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0
