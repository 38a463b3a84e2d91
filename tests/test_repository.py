"""The repository stays small enough to clone quickly and to send to a GPU machine (64 MiB): tracked files
≤ 40 MiB, no fitted weights, and a new run's bulky files are git-ignored wherever it is written under results/."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 40 * 2**20


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)


def test_tracked_files_stay_under_40_mib_and_hold_no_weights():
    listed = _git("ls-files", "-z")
    assert listed.returncode == 0, f"these tests need the git checkout: {listed.stderr.decode()}"
    files = [f for f in listed.stdout.decode().split("\0") if f]
    total = sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file())
    assert total <= LIMIT, f"tracked files take {total / 2**20:.1f} MiB > 40 MiB: commit summaries, not bulk"
    assert not [f for f in files if f.endswith((".safetensors", ".joblib", ".pt", ".bin"))]


def test_a_new_runs_weights_and_fold_files_are_ignored_anywhere_under_results():
    bulky = ["results/table1/runs/x/intervention_fold0/intervention.safetensors", "results/sweeps/s/p=1/fold_0.json",
             "results/a/b/fold_1.gen.json", "results/runs/any/results.json"]
    kept = ["results/table1/runs/x/results.json", "results/a/b/per_question.jsonl.gz",
            "results/a/b/intervention_fold0/config.json"]
    ignored = _git("check-ignore", "--no-index", *bulky, *kept).stdout.decode().split()
    assert set(ignored) == set(bulky)
