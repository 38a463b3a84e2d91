"""The human judge labels (TruthfulQA's ``finetune_truth.jsonl`` / ``finetune_info.jsonl``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.data.truthfulqa import DataNotFoundError
from bench.paths import find_data_file

LABEL_FILES = {"truth": "finetune_truth.jsonl", "info": "finetune_info.jsonl"}


@dataclass(frozen=True)
class LabelledAnswer:
    question: str
    answer: str
    label: bool


def parse_label_line(line: str, aspect: str, where: str) -> LabelledAnswer:
    """Parse one ``{"prompt": "Q: ...\\nA: ...\\nTrue:", "completion": " yes"}`` record."""
    suffix = {"truth": "\nTrue:", "info": "\nHelpful:"}[aspect]
    try:
        rec = json.loads(line)
        prompt, completion = rec["prompt"], rec["completion"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a label record ({exc}); expected "
                         '{"prompt": "Q: ...\\nA: ...' + suffix.strip() + '", "completion": " yes"|" no"}') from None
    if not prompt.startswith("Q: ") or not prompt.endswith(suffix) or "\nA:" not in prompt:
        raise ValueError(f"{where}: prompt must look like 'Q: ...\\nA: ...{suffix!r}', got {prompt[:80]!r}")
    if completion.strip() not in ("yes", "no"):
        raise ValueError(f"{where}: completion must be ' yes' or ' no', got {completion!r}")
    body = prompt[3:-len(suffix)]
    question, answer = body.split("\nA:", 1)
    return LabelledAnswer(question.strip(), answer.strip(), completion.strip() == "yes")


def find_label_file(aspect: str, data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/[truthfulqa/]finetune_{truth,info}.jsonl``, else ``$BENCH_DATA_DIR``; error lists the places."""
    name = LABEL_FILES[aspect]
    path, tried = find_data_file(data_dir, name, Path("truthfulqa") / name)
    if path is not None:
        return path
    raise DataNotFoundError(
        f"human judge labels {name} not found; tried: {', '.join(map(str, tried)) or '(nothing)'}. Pass --data-dir or set "
        f"BENCH_DATA_DIR to a directory holding truthfulqa/{name} (TruthfulQA repo, data/{name})")


def load_labels(aspect: str, data_dir: str | Path | None = None, path: str | Path | None = None) -> list[LabelledAnswer]:
    """All labelled answers for ``aspect`` ("truth" or "info"), in file order."""
    if aspect not in LABEL_FILES:
        raise ValueError(f"unknown aspect {aspect!r}; valid: {', '.join(LABEL_FILES)}")
    p = Path(path) if path else find_label_file(aspect, data_dir)
    out = []
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{p}, line {n}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if line.strip():
                out.append(parse_label_line(line, aspect, f"{p}, line {n}"))
    if not out:
        raise ValueError(f"{p} holds no labels")
    return out
