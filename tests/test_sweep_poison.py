"""A sweep's per-fold choice reads only that fold's training/validation questions (no test label)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.data.truthfulqa import make_folds

runner = CliRunner()


def _poison(src: Path, dst: Path, test: set[int]) -> None:
    """A copy of the TruthfulQA CSV whose ``test`` questions have new texts and swapped true/false answers."""
    rows = list(csv.reader(src.open(newline="")))
    head, body = rows[0], rows[1:]
    q, best, good, bad = (head.index(c) for c in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"))
    for i in test:
        r = body[i]
        r[q], r[best], r[good], r[bad] = r[q] + " Or not?", r[bad].split(";")[0], r[bad], r[good]
    dst.parent.mkdir(parents=True)
    with dst.open("w", newline="") as fh:
        csv.writer(fh).writerows([head, *body])
    for f in src.parent.glob("*.jsonl"):
        (dst.parent / f.name).write_text(f.read_text())


def _sweep(data: Path, out: Path) -> list[str]:
    args = ["sweep", "--method", "florain", "--param", "lam", "--values", "2,30", "--model", "{model}",
            "--data-dir", str(data), "--limit", "12", "--set", "epochs=2", "--set", "rank=2", "--no-compile",
            "--output", str(out)]
    return args


def test_a_fold_s_sweep_choice_never_reads_its_test_questions(tiny_dir, tqa_dir, tmp_path):
    """Poisoning fold 0's test questions leaves fold 0's validation scores (every grid point; the layer is chosen
    per fold inside each point) and its chosen value unchanged; fold 1, which trains on them, does change."""
    test0 = set(make_folds(12, 2, 0.2, 42)[0].test)
    poisoned = tmp_path / "poisoned"
    _poison(tqa_dir / "truthfulqa" / "TruthfulQA.csv", poisoned / "truthfulqa" / "TruthfulQA.csv", test0)
    sweeps = []
    for data, name in ((tqa_dir, "clean"), (poisoned, "poisoned")):
        args = [str(tiny_dir) if a == "{model}" else a for a in _sweep(data, tmp_path / name)]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        sweeps.append(json.loads((tmp_path / name / "sweep.json").read_text()))
    clean, dirty = sweeps

    def val(sweep: dict, k: int) -> list[float]:
        return [next(f for f in p["folds"] if f["fold"] == k)["metrics"]["mc2"]["mean"] for p in sweep["points"]]

    assert val(clean, 0) == pytest.approx(val(dirty, 0), abs=1e-6)
    assert clean["chosen"]["per_fold"]["0"] == dirty["chosen"]["per_fold"]["0"]
    assert val(clean, 1) != pytest.approx(val(dirty, 1), abs=1e-6)  # the poisoning reaches what may read it
