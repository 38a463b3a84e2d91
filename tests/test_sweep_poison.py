"""A sweep's per-fold choice reads only that fold's training/validation questions (no test label)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
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


def _sweep(model: Path, data: Path, out: Path) -> list[str]:
    return ["sweep", "--method", "florain", "--param", "lam", "--values", "2,30", "--model", str(model),
            "--data-dir", str(data), "--limit", "12", "--set", "epochs=15", "--set", "lr=0.05", "--set", "rank=2",
            "--no-compile", "--output", str(out)]


def test_a_fold_s_sweep_choice_never_reads_its_test_questions(tiny_dir, tqa_dir, tmp_path):
    """Poisoning fold 0's test questions leaves everything fold 0 chooses with unchanged: its layer (chosen inside
    each grid point by the probe rule), its fitted maps, its validation scores and its chosen value."""
    import torch

    test0 = set(make_folds(12, 2, 0.2, 42)[0].test)
    poisoned = tmp_path / "poisoned"
    _poison(tqa_dir / "truthfulqa" / "TruthfulQA.csv", poisoned / "truthfulqa" / "TruthfulQA.csv", test0)
    sweeps = []
    for data, name in ((tqa_dir, "clean"), (poisoned, "poisoned")):
        r = runner.invoke(app, _sweep(tiny_dir, data, tmp_path / name))
        assert r.exit_code == 0, r.output
        sweeps.append(json.loads((tmp_path / name / "sweep.json").read_text()))
    clean, dirty = sweeps

    def val(sweep: dict, k: int) -> list[float]:
        return [next(f for f in p["folds"] if f["fold"] == k)["metrics"]["mc2"]["mean"] for p in sweep["points"]]

    scores = val(clean, 0)
    assert abs(scores[0] - scores[1]) > 1e-5  # the grid points differ (75x the tolerance below): not a tie
    assert scores == pytest.approx(val(dirty, 0), abs=1e-6)
    assert clean["chosen"]["per_fold"]["0"] == dirty["chosen"]["per_fold"]["0"]
    for point in ("lam=2", "lam=30"):
        a, b = tmp_path / "clean" / point, tmp_path / "poisoned" / point
        layers = [{k: v for k, v in json.loads((d / "fold_0.layer.json").read_text()).items() if k != "seconds"}
                  for d in (a, b)]
        assert layers[0] == layers[1] and "layer" in layers[0]
        weights = sorted((a / "intervention_fold0").glob("*.safetensors"))
        assert weights
        for w in weights:
            mine, theirs = load_file(w), load_file(b / "intervention_fold0" / w.name)
            assert mine.keys() == theirs.keys()
            for key in mine:  # poisoned texts change capture batches' padding: float rounding (≈2e-5 after 15
                # epochs at this lr, on parameters of size 0.01–1); fold 1's maps, fitted on them, move by 0.05–0.5
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-4)
        # the check has teeth: fold 1 trains on fold 0's test questions, and its maps do move
        mine, theirs = (load_file(d / "intervention_fold1" / "intervention.safetensors") for d in (a, b))
        assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) > 1e-2
