"""JSON-lines reading with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (write null for a missing number)")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, record)`` for every non-blank line. A UTF-8 byte-order mark is read past; a line that is not
    UTF-8, not valid JSON (``NaN``/``Infinity`` included) or not an object raises with the file and its number, and
    so does a file without a single record."""
    path = Path(path)
    found = False
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file "
                                 "as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_no_constant)
            except ValueError as exc:  # json.JSONDecodeError or a NaN/Infinity constant
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise ValueError(f"{path}, line {n}: not valid JSON ({reason}): {line[:80]!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
            found = True
            yield n, rec
    if not found:
        raise ValueError(f"{path} holds no records; expected one JSON object per line")
