"""The real embedded default model, end to end: FLORAIN changes MC2 relative to no intervention."""

import json

from typer.testing import CliRunner

from bench.cli import app


def test_florain_on_smollm2_differs_from_none(shared_data, tmp_path):
    runner = CliRunner()
    common = ["--model", "smollm2-135m", "--data-dir", str(shared_data), "--limit", "8"]
    r0 = runner.invoke(app, ["run", "--method", "none", *common, "--output", str(tmp_path / "none")])
    assert r0.exit_code == 0, r0.output
    r1 = runner.invoke(app, ["run", "--method", "florain", *common, "-O", "epochs=5", "--no-compile",
                             "--output", str(tmp_path / "florain")])
    assert r1.exit_code == 0, r1.output
    none = json.loads((tmp_path / "none" / "results.json").read_text())
    florain = json.loads((tmp_path / "florain" / "results.json").read_text())
    assert florain["config"]["layer"] is None  # no paper layer: each fold chose its own by the probe rule
    layers = [f["layer"] for f in florain["folds"]]
    assert all(0 <= x < 30 for x in layers)
    assert [json.loads((tmp_path / "florain" / f"fold_{k}.layer.json").read_text())["layer"] for k in (0, 1)] == layers
    assert florain["method_version"] == 2 and florain["folds"][0]["intervention_info"]["extrapolation"] == "raw"
    assert "smollm2-135m" in florain["model"]["identity"]
    assert abs(florain["metrics"]["mc2"]["mean"] - none["metrics"]["mc2"]["mean"]) > 1e-4
    info = florain["folds"][0]["intervention_info"]
    assert info["heads"] == 9 and info["head_dim"] == 64 and info["n_train_samples"] > 0
