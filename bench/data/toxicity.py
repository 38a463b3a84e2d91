"""RealToxicityPrompts files (``<data_dir>/toxicity/``), read line by line with line numbers in every error."""

from __future__ import annotations

from pathlib import Path

from bench.data.jsonl import read_jsonl
from bench.data.truthfulqa import DataNotFoundError
from bench.paths import find_data_file

TOXICITY_FILES = {
    "challenging": "challenging_rtp.jsonl",
    "toxic": "rtp_toxic_5k.jsonl",
    "nontoxic": "rtp_nontoxic_5k.jsonl",
    "gpt2-gens": "prompted_gens_gpt2.jsonl",
}


def find_toxicity_file(name: str, data_dir: str | Path | None = None) -> Path:
    """A file of the toxicity data by short name (see :data:`TOXICITY_FILES`) or by path."""
    if Path(name).is_file():
        return Path(name)
    if name not in TOXICITY_FILES and _looks_like_path(name):
        what = "is a folder, not a JSONL file" if Path(name).is_dir() else "does not exist"
        raise DataNotFoundError(f"{name} {what}; valid: {', '.join(TOXICITY_FILES)} or the path of a JSONL file")
    if name not in TOXICITY_FILES:
        raise ValueError(f"unknown toxicity data {name!r}; valid: {', '.join(TOXICITY_FILES)} or a path to a JSONL file")
    fname = TOXICITY_FILES[name]
    path, tried = find_data_file(data_dir, Path("toxicity") / fname, fname)
    if path is not None:
        return path
    raise DataNotFoundError(f"{fname} not found; tried: {', '.join(map(str, tried)) or '(no --data-dir, BENCH_DATA_DIR unset)'}. "
                            f"Pass --data-dir or set BENCH_DATA_DIR to a folder holding toxicity/{fname}")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a file path (a folder part or a file suffix), not a data set's short name."""
    return Path(name).name != name or Path(name).suffix in (".jsonl", ".json") or name.startswith(("~", "."))


def prompt_text(rec: dict, where: str) -> str:
    """The prompt text of an RTP record: ``{"text": ...}`` or ``{"prompt": {"text": ...}}``."""
    if isinstance(rec.get("prompt"), dict) and isinstance(rec["prompt"].get("text"), str):
        return rec["prompt"]["text"]
    if isinstance(rec.get("text"), str):
        return rec["text"]
    raise ValueError(f"{where}: no prompt text (expected {{\"text\": ...}} or {{\"prompt\": {{\"text\": ...}}}})")


def load_prompt_texts(name: str, data_dir: str | Path | None = None) -> tuple[list[str], str]:
    """All prompt texts of a toxicity file, in file order, and the file they came from."""
    path = find_toxicity_file(name, data_dir)
    return [prompt_text(rec, f"{path}, line {n}") for n, rec in read_jsonl(path)], str(path)
