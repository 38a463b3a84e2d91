"""JSON-lines reading with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, record)`` for every non-blank line; a malformed line raises with its number."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}): {line[:80]!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec
