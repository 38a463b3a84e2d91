"""TruthfulQA loader (CSV in a data directory, else the Hub) and ITI-compatible cross-validation folds."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.paths import data_roots, find_data_file

CSV_NAME = "TruthfulQA.csv"
CSV_COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")
HUB_ID, HUB_CONFIG = "truthfulqa/truthful_qa", "generation"


class DataNotFoundError(FileNotFoundError):
    """No usable copy of a data set was found; the message lists every place tried."""


@dataclass(frozen=True)
class Question:
    """One TruthfulQA question; answers normalised as TruthfulQA does (stripped, trailing period)."""

    index: int
    question: str
    best_answer: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    category: str = ""
    type: str = ""


def close_answer(answer: str) -> str:
    """Strip and end with a period (TruthfulQA's ``format_best`` / ``split_multi_answer(close=True)``)."""
    answer = answer.strip()
    return answer if not answer or answer.endswith(".") else answer + "."


def split_answers(cell: str, sep: str = ";") -> tuple[str, ...]:
    """Split a ``;``-separated answer cell, dropping empty parts."""
    return tuple(close_answer(a) for a in cell.strip().split(sep) if a.strip())


def _from_csv(path: Path) -> list[Question]:
    """Every question of a TruthfulQA CSV; a malformed file is refused naming the file, the row and the problem.

    A UTF-8 byte-order mark is read past. Cells reading ``nan`` (a missing value written out as text) are refused,
    never taken for answers; empty parts of an answer cell are dropped (as TruthfulQA's ``split_multi_answer``)."""
    rows = _csv_rows(path)
    header = rows[0][1] if rows else []
    _check_header(path, header)
    out: list[Question] = []
    seen: dict[str, int] = {}
    for i, (line, fields) in enumerate(rows[1:]):
        where = f"{path}, data row {i + 1} (line {line})"
        if len(fields) != len(header):
            raise ValueError(f"{where} has {len(fields)} fields, expected {len(header)} ({', '.join(header)}): "
                             "the row is cut off or a cell holds an unquoted comma")
        q = _question(i, dict(zip(header, fields)), where)
        if q.question in seen:
            raise ValueError(f"{where} repeats the question of data row {seen[q.question] + 1} ({q.question!r}): a "
                             "question twice could sit in a training and a test fold at once; remove one")
        seen[q.question] = i
        out.append(q)
    if not out:
        raise ValueError(f"{path} holds no questions (a header and no data rows); expected the 817 rows of "
                         "TruthfulQA.csv")
    return out


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number where the row ends, fields)`` of every non-blank row; encoding and quoting errors name the
    file (and the line)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
                         "UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return [(reader.line_num, r) for r in reader if r]
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({err}); the file may be cut off inside a "
                         "quoted cell") from None


def _check_header(path: Path, header: list[str]) -> None:
    if not header:
        raise ValueError(f"{path} is empty; expected a header row with the columns {', '.join(CSV_COLUMNS)}")
    missing = [c for c in CSV_COLUMNS[:6] if c not in header]
    if not missing:
        return
    hint = next((f" (the header is one field holding {sep!r}: the file is {name}-separated, not comma-separated)"
                 for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))
                 if len(header) == 1 and sep in header[0]), "")
    raise ValueError(f"{path} is not a TruthfulQA CSV: missing column(s) {missing}; expected {list(CSV_COLUMNS)}"
                     + hint)


def _question(i: int, row: dict[str, str], where: str) -> Question:
    """The question of one data row, refused when a required cell is empty or NaN."""
    for column in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"):
        parts = [row[column]] if column in ("Question", "Best Answer") else row[column].split(";")
        if any(p.strip().lower() == "nan" for p in parts):
            raise ValueError(f"{where}, column {column!r}: 'nan' (a missing value written as text) is no "
                             "question or answer; fill in the cell or remove the row")
    correct, incorrect = split_answers(row["Correct Answers"]), split_answers(row["Incorrect Answers"])
    empty = [what for what, value in (("Question", row["Question"].strip()), ("Best Answer", row["Best Answer"].strip()),
                                      ("Correct Answers", correct), ("Incorrect Answers", incorrect)) if not value]
    if empty:
        raise ValueError(f"{where}: empty {', '.join(empty)}; every question needs its text, a best answer and at "
                         "least one correct and one incorrect answer")
    return Question(i, row["Question"].strip(), close_answer(row["Best Answer"]), correct, incorrect,
                    row["Category"], row["Type"])


def _from_hub() -> list[Question]:
    from datasets import load_dataset

    ds = load_dataset(HUB_ID, HUB_CONFIG, split="validation")
    return [
        Question(i, r["question"].strip(), close_answer(r["best_answer"]),
                 tuple(close_answer(a) for a in r["correct_answers"] if a.strip()),
                 tuple(close_answer(a) for a in r["incorrect_answers"] if a.strip()), r["category"], r["type"])
        for i, r in enumerate(ds)
    ]


def load_truthfulqa(data_dir: str | Path | None = None, use_hub: bool = True) -> tuple[list[Question], str]:
    """All 817 questions in dataset order, and where they came from: the CSV found by
    :func:`bench.paths.find_data_file` (``--data-dir``, then ``$BENCH_DATA_DIR``; each: ``truthfulqa/`` or top
    level), else the Hub."""
    path, candidates = find_data_file(data_dir, Path("truthfulqa") / CSV_NAME, CSV_NAME)
    if path is not None:
        return _from_csv(path), str(path)
    tried = [f"{p} (not found)" for p in candidates]
    if use_hub:
        try:
            return _from_hub(), f"hub:{HUB_ID}/{HUB_CONFIG}"
        except Exception as err:  # noqa: BLE001 - any Hub failure is reported with the rest
            tried.append(f"Hugging Face Hub {HUB_ID} ({HUB_CONFIG}): {type(err).__name__}: {str(err)[:200]}")
    if not data_roots(data_dir):
        tried.insert(0, "--data-dir (not given) and $BENCH_DATA_DIR (not set)")
    raise DataNotFoundError(
        f"TruthfulQA not found. Expected {CSV_NAME} (columns {', '.join(CSV_COLUMNS)}). Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nPass --data-dir DIR or set BENCH_DATA_DIR to a folder holding truthfulqa/TruthfulQA.csv."
    )


def checksum(questions: list[Question]) -> str:
    """SHA-256 of the normalised records: identifies the exact data a result was computed on."""
    payload = json.dumps([[q.question, q.best_answer, q.correct, q.incorrect] for q in questions])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Fold:
    """Question indices (positions in the loaded list) of one cross-validation fold."""

    fold: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def make_folds(n: int, n_folds: int = 2, val_ratio: float = 0.2, seed: int = 42) -> list[Fold]:
    """ITI's split: contiguous test blocks in dataset order (``np.array_split``); the rest of each fold is
    split ``1 − val_ratio`` / ``val_ratio`` into train / validation by ``np.random.choice`` without
    replacement, drawn fold after fold from one ``RandomState(seed)`` (as ITI's global seed does).
    """
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} questions into {n_folds} folds")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must lie in [0, 1), got {val_ratio}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must lie in 0..{2**32 - 1} (NumPy's seeds), got {seed}")
    rng = np.random.RandomState(seed)
    blocks = np.array_split(np.arange(n), n_folds)
    folds = []
    for i in range(n_folds):
        rest = np.concatenate([b for j, b in enumerate(blocks) if j != i])
        train = rng.choice(rest, size=int(len(rest) * (1 - val_ratio)), replace=False)
        val = np.array([x for x in rest if x not in set(train.tolist())])
        folds.append(Fold(i, tuple(sorted(int(x) for x in train)), tuple(int(x) for x in val),
                          tuple(int(x) for x in blocks[i])))
    return folds
