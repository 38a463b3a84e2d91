"""``python -m bench.gpu_check --device cpu --tiny``: the GPU check's code path end to end on the CPU, in an
environment as bare as the GPU machine's (scipy, accelerate, rich, typer, pandas, lm-eval, datasets and
scikit-learn hidden). Tested with transformers 5.25 here and 5.17 (the GPU machine's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"rich", "typer", "pandas", "lm_eval", "datasets", "sklearn"}
#: Hidden before anything is imported, as if missing: packages transformers imports whenever they are installed
#: (scipy, accelerate; transformers 5.17, the GPU machine's, also rich and scikit-learn), and the optional ones, so
#: the run shows that neither the check nor transformers needs them (an import of one fails its part).
HIDDEN = ("scipy", "accelerate", *sorted(OPTIONAL))
RUN_BARE = (
    "import runpy, sys\n"
    f"for name in {HIDDEN!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['bench.gpu_check', *sys.argv[1:]]\n"
    "runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)\n"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, "-c", RUN_BARE, "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.fixture(scope="module")
def result(tiny_run: tuple[subprocess.CompletedProcess, Path]) -> dict:
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_exits_zero_and_writes_both_files(tiny_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "gpu_check.json").is_file() and (out / "gpu_check.md").is_file()
    for part in ("bf16_agreement", "build", "hooks", "capture", "fit", "generation", "mc"):
        assert f"{part}: done" in proc.stderr  # one progress line per part, on stderr
    md = (out / "gpu_check.md").read_text()
    assert "all checks passed" in md and "tolerance 0.02" in md and "## Greedy generation" in md


def test_every_part_has_positive_figures(result: dict) -> None:
    parts = result["parts"]
    assert set(parts) == {"build", "capture", "fit", "generation", "mc"}
    assert set(parts["generation"]["batches"]) == {"1", "4"}
    for row in parts["generation"]["batches"].values():
        assert min(row[f"{k}_tok_s"] for k in ("plain", "florain", "iti")) > 0
    assert min(parts["mc"][f"{k}_answers_per_s"] for k in ("plain", "florain", "iti")) > 0
    assert parts["mc"]["answers"] == 70
    capture = parts["capture"]
    assert capture["answers_timed"] == capture["answers"] == 200 and capture["answers_per_s"] > 0
    fit = parts["fit"]
    assert fit["device"]["seconds_per_epoch"] > 0 and fit["device"]["extrapolated_s"] > 0
    assert fit["library_cpu"]["seconds_per_epoch"] > 0 and fit["library_cpu"]["extrapolated_s"] > 0
    assert parts["build"]["parameters"] > 0
    assert all(p["wall_s"] > 0 for p in parts.values())
    assert result["total_wall_s"] > 0


def test_records_the_environment(result: dict) -> None:
    meta = result["meta"]
    assert meta["torch"] == torch.__version__ and meta["transformers"]
    assert meta["mode"] == "tiny" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["model"]["layers"] == 2 and meta["model"]["heads"] == 4 and meta["model"]["head_dim"] == 16


def test_checks_pass_within_the_stated_tolerance(result: dict) -> None:
    checks = result["checks"]
    assert result["passed"] and result["errors"] == {}
    assert checks["hook_every_step"]["passed"] and checks["hooks_removed"]["passed"]
    assert checks["hook_every_step"]["hook_calls"] == checks["hook_every_step"]["forward_calls"] == 8
    agreement = checks["bf16_agreement"]
    assert agreement["passed"] and agreement["dtype"] == "bfloat16" and agreement["rtol"] == 2e-2
    assert 0 < agreement["max_rel"] <= agreement["rtol"]
    for edit in ("florain", "iti"):
        assert set(agreement[edit]) >= {"edit_only", "edited_acts", "logits"}
        assert agreement[edit]["edit_size"] > 1e-3  # the edit really moved the activations


def test_the_bare_run_went_without_the_hidden_packages(result: dict) -> None:
    assert result["optional_imported"] == []
    assert not set(result["info_imported"]) & set(HIDDEN)


def test_the_check_imports_no_optional_package_beyond_what_transformers_does() -> None:
    """With everything installed, importing the check adds none of the optional packages to what transformers and
    its Llama model imported already (transformers itself may import some whenever they are installed)."""
    code = ("import json, sys\nfrom transformers import LlamaConfig, LlamaForCausalLM\nbefore = set(sys.modules)\n"
            "import bench.gpu_check\nprint(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    added = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"bench", "florain", "baselines"} <= added  # the check's own modules were imported here
    assert not added & OPTIONAL, added & OPTIONAL


@pytest.mark.parametrize("failure", ["check", "part"])
def test_a_failed_check_or_part_gives_exit_code_1(failure: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu_check

    def fake_run_all(report: gpu_check.Report, *_args: object) -> None:
        if failure == "check":
            report.run("checks", "hooks", lambda: {"hooks_removed": {"passed": False}})
        else:
            report.run("parts", "mc", lambda: {"x": 1 / 0})

    monkeypatch.setattr(gpu_check, "_run_all", fake_run_all)
    argv = ["--device", "cpu", "--tiny", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["passed"] is False
    assert "FAILED" in (tmp_path / "gpu_check.md").read_text()
    assert not any(sys.modules.get(name, 0) is None for name in OPTIONAL)  # the blocking was undone
