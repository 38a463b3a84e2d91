"""A resumed run whose saved intervention is damaged or does not match: detected on load with the exact fix, and
``--resume --refit`` fits just that fold again (keeping its evaluated parts when the new fit is the same)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.runs import RunFolder
from conftest import write_label_files, write_tqa_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """One finished tiny FLORAIN run (MC only), its data folder and the command that made it."""
    data = tmp_path_factory.mktemp("tqa")
    write_tqa_csv(data / "truthfulqa" / "TruthfulQA.csv")
    write_label_files(data / "truthfulqa")
    out = tmp_path_factory.mktemp("runs") / "florain"
    args = ["run", "--method", "florain", "--model", str(tiny_dir), "--data-dir", str(data), "--limit", "12",
            "--layer", "1", "-O", "epochs=3", "-O", "rank=2", "--no-compile", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, data, args


def _edit_config(change: Callable[[dict], None], drop_digest: bool = True) -> Callable[[Path], None]:
    """Edit fold 0's saved config.json; ``drop_digest``: as a run saved before fits recorded their digest, so the
    edit is caught by the checks against the run rather than by the digest."""
    def damage(run: Path) -> None:
        path = run / "intervention_fold0" / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
        if drop_digest:
            fit = run / "fold_0.fit.json"
            fit.write_text(json.dumps({k: v for k, v in json.loads(fit.read_text()).items() if k != "sha256"}))
    return damage


def _weights(run: Path) -> Path:
    return run / "intervention_fold0" / "intervention.safetensors"


#: (id, damage, message, whether the refit keeps fold 0's MC part: only when the fit record holds a digest to
#: compare the new fit with)
CASES = [
    ("weights-truncated", lambda run: _weights(run).write_bytes(_weights(run).read_bytes()[:100]), "is damaged", True),
    ("weights-garbage", lambda run: _weights(run).write_bytes(b"not a safetensors file"), "is damaged", True),
    ("weights-missing", lambda run: _weights(run).unlink(), "intervention.safetensors missing", True),
    ("config-garbage", lambda run: (run / "intervention_fold0" / "config.json").write_text("{"), "is damaged", True),
    ("config-edited", _edit_config(lambda c: c.update(heads=99), drop_digest=False), "is not what the fit saved",
     True),
    ("other-data", _edit_config(lambda c: c.update(data_checksum="0" * 64)), "fitted on other data", False),
    ("other-model-shape", _edit_config(lambda c: c.update(heads=99)), "does not match this run", False),
    ("other-method", _edit_config(lambda c: c.update(method="mean-shift")), "intervention_fold0", False),
]


@pytest.mark.parametrize(("damage", "message", "kept"), [pytest.param(d, m, k, id=i) for i, d, m, k in CASES])
def test_a_damaged_saved_intervention_is_reported_with_the_fix_and_refit_recovers(finished, tmp_path, damage,
                                                                                   message, kept):
    done, _, args = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    out_arg = args.index("--output") + 1
    args = [*args[:out_arg], str(run), *args[out_arg + 1:]]
    (run / "results.json").unlink()  # as if killed after fold 0's MC part, before the fold was written
    (run / "fold_0.json").unlink()
    damage(run)
    refused = runner.invoke(app, [*args, "--resume"])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), refused.output
    assert message in text and "--refit" in text and "Traceback" not in text
    assert not (run / "results.json").exists()
    recovered = runner.invoke(app, [*args, "--resume", "--refit"])
    assert recovered.exit_code == 0, recovered.output
    before, after = RunFolder(done).read_results(), RunFolder(run).read_results()
    assert after["metrics"] == before["metrics"]  # the fit is deterministic: the same numbers
    assert RunFolder(run).read_per_question() == RunFolder(done).read_per_question()
    fit = json.loads((run / "fold_0.fit.json").read_text())
    assert fit["sha256"] == json.loads((done / "fold_0.fit.json").read_text())["sha256"]
    # the new fit is file-for-file the earlier one: fold 0's MC part is kept unless the fit record had no digest
    assert ("fold_0.mc.json" in after["timings"]["reused"]) == kept


def test_refit_needs_resume(finished, tmp_path):
    _, _, args = finished
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "new"), "--refit"])
    assert result.exit_code == 2 and "--resume --refit" in " ".join(result.output.split())
    assert not (tmp_path / "new").exists()
