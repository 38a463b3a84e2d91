"""Bring your own method: the README's example plugin, installed through an entry point, runs end to end through
``bench run``, ``bench sweep`` and ``bench methods``; the one same-run rule holds for its options."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench.interventions as registry
from bench.cli import app
from bench.interventions import METHOD_ENTRY_POINTS, METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def _readme_example(heading: str = "## Add your own method", group: str = METHOD_ENTRY_POINTS) -> tuple[str, dict]:
    """A README "Add your own ..." section's module (first python block) and its entry points (toml block)."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 5)]
    module = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)  # (tomllib needs Python 3.11)
    assert f'[project.entry-points."{group}"]' in toml
    return module, dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', toml, re.M))


def _install(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str],
             group: str = METHOD_ENTRY_POINTS) -> None:
    """A minimal installed distribution under ``root``: its modules and a dist-info with the entry points."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's plugin installed on sys.path (and one broken plugin beside it); the registry reloads."""
    import importlib

    module, eps = _readme_example()
    root = tmp_path / "site"
    root.mkdir()
    _install(root, "my-steering", {"my_steering": module}, eps)
    _install(root, "broken-plugin", {}, {"broken": "no_such_module_here"})
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", False)
    yield eps
    METHODS.pop("half-shift", None)
    sys.modules.pop("my_steering", None)


def _cli(*args: str):
    r = runner.invoke(app, list(args))
    r.text = " ".join(r.output.split())
    return r


def test_the_readme_plugin_is_listed_and_shows_its_options(plugin, caplog):
    assert plugin == {"half-shift": "my_steering"}
    r = _cli("methods", "list")
    assert r.exit_code == 0 and "half-shift" in r.text and "my_steering" in r.text and "florain" in r.text
    assert "broken" in caplog.text and "failed to load" in caplog.text  # reported, the others still load
    r = _cli("methods", "show", "half-shift")
    assert r.exit_code == 0 and "scale" in r.text and "0.5" in r.text and "multiple of the class-mean" in r.text


def test_the_readme_plugin_runs_resumes_by_the_one_rule_and_sweeps(plugin, tiny_dir, tqa_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12", "--layer", "1"]
    out = tmp_path / "run"
    r = _cli("run", "--method", "half-shift", *common, "--output", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["options"] == {} and res["method_options"] == {"scale": 0.5}
    iv = registry.Intervention.from_pretrained(out / "intervention_fold0")  # rebuilt by the plugin's build
    assert iv.method == "half-shift" and iv.config["scale"] == 0.5 and iv.modules[1].shift.abs().sum() > 0
    # the same run: the default stated explicitly; another value is another run
    r = _cli("run", "--method", "half-shift", *common, "-O", "scale=0.5", "--output", str(out), "--resume")
    assert r.exit_code == 0, r.output
    r = _cli("run", "--method", "half-shift", *common, "-O", "scale=3", "--output", str(out), "--resume")
    assert r.exit_code == 2 and "started with a different configuration" in r.text, r.output
    r = _cli("run", "--method", "half-shift", *common, "-O", "scale=-1", "--output", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "option scale must be ≥ 0, got -1" in r.text and not (tmp_path / "bad").exists()
    r = _cli("run", "--method", "half-shift", *common, "-O", "gamma=1", "--output", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "has no option 'gamma'; valid: scale" in r.text
    sweep = tmp_path / "sweep"
    args = ["sweep", "--method", "half-shift", "--param", "scale", "--values", "0.5,2", *common, "--no-baseline",
            "--no-final", "--no-plot", "--output", str(sweep)]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [p["value"] for p in points] == [0.5, 2.0]
    # the sweep's point at the default is the same run as `bench run` without -O: the same rule, so reused
    r = _cli(*args)
    assert r.exit_code == 0 and r.text.count("finished, reusing") == 2, r.output


@pytest.fixture()
def task_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's task plugin installed on sys.path through the tasks entry-point group."""
    import importlib

    import bench.metrics
    import bench.tasks

    module, eps = _readme_example("## Add your own task", bench.tasks.ENTRY_POINT_GROUP)
    root = tmp_path / "site"
    root.mkdir()
    _install(root, "my-task", {"my_task": module}, eps, bench.tasks.ENTRY_POINT_GROUP)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setattr(bench.tasks, "_plugins_loaded", False)
    yield eps
    bench.tasks.TASKS.pop("truthfulqa-best-nll", None)
    bench.tasks.PARTS.pop("best-nll", None)
    bench.metrics._DECLARED.pop("best_answer_nll", None)
    sys.modules.pop("my_task", None)


def test_the_readme_task_plugin_runs_through_run_table_and_sweep(task_plugin, tiny_dir, tqa_dir, tmp_path):
    assert task_plugin == {"truthfulqa-best-nll": "my_task"}
    r = _cli("tasks", "list")
    assert r.exit_code == 0 and "truthfulqa-best-nll" in r.text and "Best-answer NLL" in r.text, r.output
    common = ["--task", "truthfulqa-best-nll", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    runs = {}
    for method, extra in (("none", []), ("mean-shift", ["--layer", "1", "-O", "scale=4"])):
        out = tmp_path / method
        r = _cli("run", "--method", method, *common, *extra, "--output", str(out))
        assert r.exit_code == 0, r.output
        runs[method] = json.loads((out / "results.json").read_text())
        assert set(runs[method]["metrics"]) == {"best_answer_nll"} and runs[method]["metrics"]["best_answer_nll"]["n"] == 12
        assert "Best-answer NLL" in (out / "results.md").read_text()  # the label declared by the plugin's part
    assert runs["none"]["metrics"]["best_answer_nll"]["mean"] != runs["mean-shift"]["metrics"]["best_answer_nll"]["mean"]
    r = _cli("run", "--method", "none", *common, "--samples", "3", "--output", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "--samples applies to --task toxicity only" in r.text
    sweep = tmp_path / "sweep"
    r = _cli("sweep", "--method", "mean-shift", "--param", "scale", "--values", "1,4", "--metric", "best_answer_nll",
             *common, "--layer", "1", "--no-baseline", "--no-final", "--no-plot", "--output", str(sweep))
    assert r.exit_code == 0, r.output
    result = json.loads((sweep / "sweep.json").read_text())
    for k, value in result["chosen"]["per_fold"].items():  # lower is better, as the plugin's metric declares
        scores = {p["value"]: next(f for f in p["folds"] if str(f["fold"]) == k)["metrics"]["best_answer_nll"]["mean"]
                  for p in result["points"]}
        assert scores[value] == min(scores.values())
