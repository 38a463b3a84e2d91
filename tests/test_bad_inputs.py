"""Bad inputs (issue 23, item 6): every one exits non-zero with a clear message that names the problem (and the
valid values where there are some), before a model loads where it can, leaving nothing in ``--output`` that would
block the corrected command, and never with a traceback.

One table per family — A: flags of ``bench run``; B: corrupt data files; C: ``bench compare`` / ``bench table``
misuse; D: the other commands.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from bench.cli import app

runner = CliRunner()
BLOCKING = ("run_config.json", "results.json", "sweep.json")  # files that make a rerun refuse or resume the folder
Setup = Callable[[Path], list[str]]  # writes a row's files under a folder; returns the command's arguments


def _rows(table: list) -> list:
    """Table rows ``(id, *values)`` as parameter sets (rows already made with ``pytest.param`` stay as they are)."""
    return [pytest.param(*row[1:], id=row[0]) if type(row) is tuple else row for row in table]


def _invoke(args: Sequence[object]) -> Result:
    """Run ``bench ARGS`` in-process; ``result.text`` is the output on one line (rich wraps and boxes it)."""
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.replace("│", " ").split())
    return result


def _parts(expected: str | Sequence[str]) -> list[str]:
    """A row's expected message part(s) as a list."""
    return [expected] if isinstance(expected, str) else list(expected)


def _write(path: Path, content: str | bytes) -> Path:
    """Write ``content`` as it is (text: UTF-8, line ends untouched), creating the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def assert_refused(result: Result, expected: str | Sequence[str], output: Path | None = None) -> None:
    """Refused cleanly: a non-zero exit through ``SystemExit`` (no other exception, no traceback), every expected
    part in the message, and no file in ``output`` (or beside it) that would block the corrected command."""
    exc = result.exception
    assert not (isinstance(exc, AssertionError) and str(exc) == "model loaded"), (
        "the model was loaded before the problem was found:\n" + result.output)
    assert isinstance(exc, SystemExit), f"{type(exc).__name__}: {exc}\n{result.output}"
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    for part in _parts(expected):
        assert part in result.text, f"{part!r} not in: {result.text}"
    if output is not None:
        assert not output.with_name(f".{output.name}.lock").exists(), "the run folder's lock was left behind"
        if output.is_dir():
            left = [p.relative_to(output) for name in BLOCKING for p in output.rglob(name)]
            assert not left, f"left in {output}: {left}"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages on one line: rich folds long paths at the terminal width, which would cut them apart."""
    from bench.cli_common import console

    monkeypatch.setattr(console, "_width", 100_000)


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the row: these problems must be found before it."""
    import bench.runner

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model loaded")

    monkeypatch.setattr(bench.runner, "load_model", refuse)


def _good_csv(n: int = 12) -> str:
    """The text of a valid TruthfulQA CSV, as ``conftest.write_tqa_csv`` writes it (CRLF line ends)."""
    from conftest import write_tqa_csv

    with tempfile.TemporaryDirectory() as tmp:
        return write_tqa_csv(Path(tmp) / "TruthfulQA.csv", n).read_bytes().decode()


GOOD_CSV = _good_csv()
HEADER, *ROWS = GOOD_CSV.splitlines(keepends=True)


# --------------------------------------------------------------------------- A: flags of `bench run`

BASE_METHOD = ["--method", "none"]
FLORAIN = ["--method", "florain", "--layer", "1", "--no-compile"]
RUN_FLAGS = [
    ("folds-1", ["--folds", "1"], "--folds must be ≥ 2 (cross-validation), got 1"),
    ("folds-0", ["--folds", "0"], "--folds must be ≥ 2 (cross-validation), got 0"),
    ("folds-not-a-number", ["--folds", "abc"], "Invalid value for '--folds'"),
    ("val-ratio-1", ["--val-ratio", "1.0"], "--val-ratio must lie in [0, 1), got 1.0"),
    ("val-ratio-negative", ["--val-ratio", "-0.1"], "--val-ratio must lie in [0, 1), got -0.1"),
    ("val-ratio-nan", ["--val-ratio", "nan"], "--val-ratio must lie in [0, 1), got nan"),
    ("val-ratio-inf", ["--val-ratio", "inf"], "--val-ratio must lie in [0, 1), got inf"),
    ("limit-0", ["--limit", "0"], "--limit must be ≥ 1, got 0"),
    ("limit-negative", ["--limit", "-3"], "--limit must be ≥ 1, got -3"),
    ("limit-below-folds", ["--limit", "1"], "--limit 1 is too small for 2 folds"),
    ("limit-below-3-folds", ["--folds", "3", "--limit", "2"], "--limit 2 is too small for 3 folds"),
    ("kl-windows-0", ["--kl-windows", "0"], "--kl-windows must be ≥ 1, got 0"),
    ("kl-length-1", ["--kl-length", "1"], "--kl-length must be ≥ 2, got 1"),
    ("samples-0", ["--samples", "0"], "--samples must be ≥ 1, got 0"),
    ("top-p-0", ["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    ("top-p-1.5", ["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
    ("top-p-nan", ["--top-p", "nan"], "--top-p must lie in (0, 1], got nan"),
    ("top-p-not-a-number", ["--top-p", "x"], "Invalid value for '--top-p'"),
    ("max-new-tokens-0", ["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1, got 0"),
    ("mc-edit-offset-negative", ["--mc-edit-offset", "-1"], "--mc-edit-offset must be ≥ 0, got -1"),
    ("seed-negative", ["--seed", "-1"], ["--seed must lie in 0..4294967295", "got -1"]),
    ("unknown-method", ["--method", "magic"], "unknown method 'magic'; known methods: caa, few-shot, florain"),
    ("unknown-task", ["--task", "nope"], "unknown task 'nope'; valid: truthfulqa-mc, truthfulqa-gen, truthfulqa"),
    ("lm-eval-without-tasks", ["--task", "lm-eval:"], "--task lm-eval: needs at least one task name"),
    ("unknown-site", ["--site", "nowhere"], "unknown site 'nowhere'; valid: heads, attn-out, residual"),
    ("unknown-prompt-mode", ["--prompt-mode", "chat"], "unknown --prompt-mode 'chat'; valid: iti, lm-eval"),
    ("unknown-gen-preset", ["--task", "truthfulqa-gen", "--gen-preset", "chatty"],
     "unknown generation prompt preset 'chatty'; valid: iti, iti-informative, qa, lm-eval"),
    ("unknown-judge", ["--task", "truthfulqa-gen", "--judge", "oracle"],
     "unknown judge 'oracle'; valid: embedded, hf, openai"),
    ("judge-flag-for-embedded", ["--judge-model", "x"], "--judge-* options do not apply to the embedded judge"),
    ("judge-preset-for-embedded", ["--judge-preset", "allenai"], "--judge-preset applies to the hf judge only"),
    ("unknown-eval-split", ["--eval-split", "train"], "unknown evaluation split 'train'; valid: test, val"),
    ("unknown-dtype", ["--dtype", "float8"], "unknown --dtype 'float8'; valid: float32"),
    ("unknown-scorer", ["--task", "toxicity", "--scorer", "nosuch"], ["unknown toxicity scorer 'nosuch'; valid:",
                                                                       "embedded"]),
    ("unknown-steer-data", ["--task", "toxicity", "--steer-data", "nosuch"],
     "unknown --steer-data 'nosuch'; valid: gpt2-gens, rtp"),
    ("unknown-tox-prompts", ["--task", "toxicity", "--tox-prompts", "nosuch"],
     "unknown toxicity data 'nosuch'; valid: challenging, toxic, nontoxic"),
    ("missing-tox-prompts-file", ["--task", "toxicity", "--tox-prompts", "{tmp}/none.jsonl"],
     ["none.jsonl does not exist; valid: challenging, toxic, nontoxic, gpt2-gens or the path of a JSONL file"]),
    ("no-detox-variant", ["--method", "lofit", "--task", "toxicity"],
     "lofit has no detoxifying variant; --task toxicity takes: none, florain"),
    ("eval-fold-too-high", ["--eval-fold", "2"], "evaluation folds [2] out of range: valid 0..1"),
    ("eval-fold-negative", ["--eval-fold", "0", "--eval-fold", "-1"], "evaluation folds [-1] out of range: valid 0..1"),
    pytest.param(["--device", "cuda"], "no CUDA device is available here; use --device cpu", id="device-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("missing-local-model", ["--model", "./nowhere"], "--model ./nowhere: no such local folder"),
    ("unknown-model-alias", ["--model", "no-such-model"],
     "unknown model alias 'no-such-model'; known aliases: llama-7b"),
    ("layer-for-a-method-without-one", ["--layer", "1"],
     "--layer does not apply to --method none: it does not act at one chosen layer"),
    ("option-of-none", ["-O", "rank=2"], "--method none has no option 'rank'; valid: none"),
    ("unknown-option", [*FLORAIN, "-O", "nosuch=1"], "--method florain has no option 'nosuch'; valid: rank, alpha"),
    ("option-without-equals", [*FLORAIN, "-O", "rank"], "-O 'rank': expected NAME=VALUE, e.g. -O rank=16"),
    ("option-without-value", [*FLORAIN, "-O", "rank="], "-O 'rank=': missing value after '='"),
    ("option-twice", [*FLORAIN, "-O", "rank=2", "-O", "rank=3"], "-O sets 'rank' twice"),
    ("option-wrong-type", [*FLORAIN, "-O", "rank=abc"], "--method florain option rank: cannot read 'abc'; valid: int"),
    ("option-float-for-int", [*FLORAIN, "-O", "rank=2.5"], "option rank: cannot read '2.5'; valid: int"),
    ("florain-rank-0", [*FLORAIN, "-O", "rank=0"], "--method florain option rank must be ≥ 1, got 0"),
    ("florain-alpha-1.5", [*FLORAIN, "-O", "alpha=1.5"], "option alpha must be ≥ 0 and ≤ 1, got 1.5"),
    ("florain-beta-negative", [*FLORAIN, "-O", "beta=-1"], "option beta must be ≥ 0 and ≤ 1, got -1"),
    ("florain-lam-nan", [*FLORAIN, "-O", "lam=nan"], "option lam must be a finite number, got nan"),
    ("florain-lam-inf", [*FLORAIN, "-O", "lam=inf"], "option lam must be a finite number, got inf"),
    ("florain-lam-negative", [*FLORAIN, "-O", "lam=-1"], "option lam must be > 0, got -1"),
    ("florain-epochs-0", [*FLORAIN, "-O", "epochs=0"], "option epochs must be ≥ 1, got 0"),
    ("florain-lr-0", [*FLORAIN, "-O", "lr=0"], "option lr must be > 0, got 0"),
    ("florain-batch-size-0", [*FLORAIN, "-O", "batch_size=0"], "option batch_size must be ≥ 1, got 0"),
    ("florain-extrapolation", [*FLORAIN, "-O", "extrapolation=cube"], "cannot read 'cube'; valid: raw | unit"),
    ("florain-bool", [*FLORAIN, "-O", "drop_identity=maybe"], "cannot read 'maybe'; valid: true | false"),
    ("florain-lam-scale-raw", [*FLORAIN, "-O", "lam_scale=3"], "belongs to the released form"),
    ("iti-alpha-nan", ["--method", "iti", "-O", "alpha=nan"], "--method iti option alpha must be a finite number"),
    ("iti-k-0", ["--method", "iti", "-O", "k=0"], "--method iti option k must be ≥ 1, got 0"),
    ("iti-layer-negative", ["--method", "iti", "-O", "layer=-1"], "--method iti option layer must be ≥ 0, got -1"),
    ("iti-sigma-bank", ["--method", "iti", "-O", "sigma_bank=foo"], "cannot read 'foo'; valid: qa | gen_end_q | none"),
    ("lofit-epochs-0", ["--method", "lofit", "-O", "epochs=0"], "--method lofit option epochs must be ≥ 1, got 0"),
    ("lofit-beta-0", ["--method", "lofit", "-O", "beta=0"], "--method lofit option beta must be > 0, got 0"),
    ("lofit-l1-negative", ["--method", "lofit", "-O", "l1=-1"], "--method lofit option l1 must be ≥ 0, got -1"),
    ("lofit-sft-lr-0", ["--method", "lofit-sft", "-O", "lr=0"], "--method lofit-sft option lr must be > 0, got 0"),
    ("few-shot-negative", ["--method", "few-shot", "-O", "shots=-1"], "option shots must be ≥ 0, got -1"),
    ("caa-layer-negative", ["--method", "caa", "-O", "layer=-1"], "--method caa option layer must be ≥ 0, got -1"),
    ("caa-multiplier-inf", ["--method", "caa", "-O", "multiplier=inf"], "option multiplier must be a finite number"),
    ("mean-shift-scale-nan", ["--method", "mean-shift", "--layer", "1", "-O", "scale=nan"],
     "--method mean-shift option scale must be a finite number, got nan"),
    ("mean-shift-match-missing", ["--method", "mean-shift", "--layer", "1", "-O", "match={tmp}/no-run"],
     "--method mean-shift option match: {tmp}/no-run holds no intervention_fold0/"),
    ("mean-diff-wrong-type", ["--method", "mean-diff-resid", "--layer", "1", "-O", "multiplier=abc"],
     "--method mean-diff-resid option multiplier: cannot read 'abc'; valid: float"),
    ("several-at-once", [*FLORAIN, "-O", "rank=0", "--folds", "1", "--top-p", "2", "--site", "x", "--dtype", "f8"],
     ["6 problems with this run", "option rank must be ≥ 1, got 0", "unknown site 'x'", "--top-p must lie in (0, 1]",
      "--top-p applies to --task toxicity only",
      "--folds must be ≥ 2", "unknown --dtype 'f8'"]),
    ("eval-batch-size-0", ["--eval-batch-size", "0"], "--eval-batch-size must be ≥ 1, got 0"),
    ("score-batch-size-0", ["--score-batch-size", "0"], "--score-batch-size must be ≥ 1, got 0"),
    ("gen-batch-size-0", ["--task", "truthfulqa-gen", "--gen-batch-size", "0"],
            "--gen-batch-size must be ≥ 1, got 0"),
    ("sample-batch-size-0", ["--task", "toxicity", "--tox-prompts", "{tmp}/none.jsonl",
                                    "--sample-batch-size", "0"],
            "--sample-batch-size must be ≥ 1, got 0"),
    ("layer-negative", [*FLORAIN[:2], "--layer", "-1"], "--layer must be ≥ 0, got -1"),
    ("unknown-lm-eval-task", ["--task", "lm-eval:nosuch_task"], "unknown lm-eval task 'nosuch_task'"),
    ("missing-kl-source", ["--task", "kl-ce", "--kl-source", "{tmp}/none.jsonl"], "none.jsonl does not exist"),
    ("toxicity-flag-on-mc", ["--samples", "5"], "--samples applies to --task toxicity only"),
    ("output-is-a-file", ["--output", "{tmp}/a-file"], "--output {tmp}/a-file is a file, not a folder"),
]


@pytest.mark.parametrize(("args", "expected"), _rows(RUN_FLAGS))
def test_bad_run_flags_are_refused_before_the_model_loads(args: list[str], expected: str | list[str],
                                                          tiny_dir: Path, tmp_path: Path, no_model: None) -> None:
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("not a folder")
    base = ["run", *BASE_METHOD, "--model", tiny_dir, "--data-dir", tmp_path / "data", "--limit", 12, "--output", out]
    _write(tmp_path / "data" / "truthfulqa" / "TruthfulQA.csv", GOOD_CSV)
    fill = [str(a).replace("{tmp}", str(tmp_path)) for a in args]  # later flags win: a row overrides the base
    expected = [e.replace("{tmp}", str(tmp_path)) for e in _parts(expected)]
    assert_refused(_invoke([*base, *fill]), expected, out)


def _model_folder(kind: str) -> Callable[[Path, Path], Path]:
    """A folder passed as --model that holds no loadable model: empty, a config alone, or a broken config."""
    def make(tiny: Path, tmp: Path) -> Path:
        folder = tmp / f"model-{kind}"
        folder.mkdir()
        if kind in ("config-only", "no-weights"):
            shutil.copy(tiny / "config.json", folder)
        if kind == "no-weights":
            for f in tiny.glob("tokenizer*"):
                shutil.copy(f, folder)
        if kind == "broken-config":
            (folder / "config.json").write_text("{not json")
        return folder
    return make


@pytest.mark.parametrize(("model", "expected"), [
    pytest.param(_model_folder("empty"), "holds no loadable model", id="empty-folder"),
    pytest.param(_model_folder("config-only"), "holds no loadable model", id="config-only"),
    pytest.param(_model_folder("no-weights"), ["holds no loadable model", "no file named model.safetensors"],
                 id="no-weights"),
    pytest.param(_model_folder("broken-config"), ["holds no loadable model", "config.json' is not a valid JSON"],
                 id="broken-config"),
])
def test_a_folder_without_a_model_is_named(model: Callable[[Path, Path], Path], expected: str | list[str],
                                           tiny_dir: Path, tmp_path: Path) -> None:
    """Found when the model is read (after the data), before the run folder is claimed."""
    out = tmp_path / "run"
    _write(tmp_path / "data" / "truthfulqa" / "TruthfulQA.csv", GOOD_CSV)
    folder = model(tiny_dir, tmp_path)
    r = _invoke(["run", "--method", "none", "--model", folder, "--data-dir", tmp_path / "data", "--output", out])
    assert_refused(r, [f"--model {folder}: {folder} holds no loadable model", *_parts(expected)], out)


def test_a_layer_beyond_the_model_is_refused_once_its_depth_is_known(tiny_dir: Path, tqa_dir: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _invoke(["run", *FLORAIN[:2], "--layer", 99, "--model", tiny_dir, "--data-dir", tqa_dir, "--output", out])
    assert_refused(r, "layer 99 is out of range: this model has layers 0..2", out)


# --------------------------------------------------------------------------- B: corrupt data files

def _tqa(content: str | bytes) -> Setup:
    """A ``bench run`` on a data folder whose TruthfulQA.csv holds ``content``."""
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "data" / "truthfulqa" / "TruthfulQA.csv", content)
        return ["run", "--method", "none", "--data-dir", tmp / "data", "--output", tmp / "run"]
    return setup


def _tox(lines: str | bytes, *extra: str) -> Setup:
    """A toxicity run whose --tox-prompts file holds ``lines``."""
    def setup(tmp: Path) -> list[str]:
        path = _write(tmp / "prompts.jsonl", lines)
        return ["run", "--method", "none", "--task", "toxicity", "--data-dir", tmp / "data", "--tox-prompts", path,
                "--output", tmp / "run", *extra]
    return setup


def _kl_source(lines: str) -> Setup:
    """A KL/CE run whose --kl-source file holds ``lines``."""
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "data" / "truthfulqa" / "TruthfulQA.csv", GOOD_CSV)
        path = _write(tmp / "texts.jsonl", lines)
        return ["run", "--method", "none", "--task", "kl-ce", "--data-dir", tmp / "data", "--kl-source", path,
                "--output", tmp / "run"]
    return setup


def _labels(truth: str | bytes) -> Setup:
    """``bench judge train`` on a data folder whose finetune_truth.jsonl holds ``truth``."""
    def setup(tmp: Path) -> list[str]:
        from conftest import write_label_files

        write_label_files(tmp / "data" / "truthfulqa")
        _write(tmp / "data" / "truthfulqa" / "TruthfulQA.csv", GOOD_CSV)
        _write(tmp / "data" / "truthfulqa" / "finetune_truth.jsonl", truth)
        return ["judge", "train", "--data-dir", tmp / "data"]
    return setup


def _with_row(row: str, at: int = 0) -> str:
    """The valid CSV with ``row`` inserted before data row ``at``."""
    return HEADER + "".join(ROWS[:at]) + row + "".join(ROWS[at:])


CUT_IN_CELL = GOOD_CSV[: GOOD_CSV.index("Fact 5 is true;") + 8]
CUT_AFTER_FIELD = GOOD_CSV[: GOOD_CSV.index("What is fact 5?,") + 16]
LABEL = json.dumps({"prompt": "Q: What is fact 0?\nA: Fact 0 is true.\nTrue:", "completion": " yes"}) + "\n"
DATA_FILES = [
    ("csv-cut-inside-a-cell", _tqa(CUT_IN_CELL), ["TruthfulQA.csv, line 7: malformed CSV", "cut off"]),
    ("csv-cut-after-a-field", _tqa(CUT_AFTER_FIELD), "TruthfulQA.csv, data row 6 (line 7) has 4 fields, expected 7"),
    ("csv-empty", _tqa(""), "TruthfulQA.csv is empty; expected a header row with the columns Type, Category"),
    ("csv-header-only", _tqa(HEADER), "TruthfulQA.csv holds no questions (a header and no data rows)"),
    ("csv-missing-column", _tqa(GOOD_CSV.replace("Incorrect Answers", "Wrong Answers", 1)),
     "TruthfulQA.csv is not a TruthfulQA CSV: missing column(s) ['Incorrect Answers']; expected ['Type'"),
    ("csv-semicolons", _tqa(GOOD_CSV.replace(",", ";")), ["TruthfulQA.csv is not a TruthfulQA CSV",
                                                          "the file is semicolon-separated, not comma-separated"]),
    ("csv-tabs", _tqa(GOOD_CSV.replace(",", "\t")), "the file is tab-separated, not comma-separated"),
    ("csv-unquoted-comma", _tqa(_with_row("Adversarial,Test,Why?,Yes, it is,Yes,No,test\r\n")),
     "TruthfulQA.csv, data row 1 (line 2) has 8 fields, expected 7"),
    ("csv-nan-answer", _tqa(_with_row("Adversarial,Test,Why?,Yes,Yes; nan,No,test\r\n", 2)),
     "TruthfulQA.csv, data row 3 (line 4), column 'Correct Answers': 'nan' (a missing value written as text)"),
    ("csv-nan-best-answer", _tqa(_with_row("Adversarial,Test,Why?,NaN,Yes,No,test\r\n")),
     "data row 1 (line 2), column 'Best Answer': 'nan'"),
    ("csv-no-correct-answer", _tqa(_with_row("Adversarial,Test,Why?,Yes,;,No,test\r\n")),
     "TruthfulQA.csv, data row 1 (line 2): empty Correct Answers"),
    ("csv-no-incorrect-answer", _tqa(_with_row("Adversarial,Test,Why?,Yes,Yes,,test\r\n")),
     "TruthfulQA.csv, data row 1 (line 2): empty Incorrect Answers"),
    ("csv-no-question", _tqa(_with_row("Adversarial,Test, ,Yes,Yes,No,test\r\n")), "empty Question"),
    ("csv-duplicate-question", _tqa(GOOD_CSV + ROWS[0]),
     "TruthfulQA.csv, data row 13 (line 14) repeats the question of data row 1 ('What is fact 0?')"),
    ("csv-not-utf8", _tqa(GOOD_CSV.replace("fact 3", "fact \xe9").encode("latin-1")),
     "TruthfulQA.csv, line 5: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("jsonl-bad-json", _tox('{"text": "a", "score": 0.1}\n{"text": "b"\n'),
     "prompts.jsonl, line 2: not valid JSON (Expecting ',' delimiter)"),
    ("jsonl-nan", _tox('{"text": "a", "score": NaN}\n'), "prompts.jsonl, line 1: not valid JSON (NaN is not valid"),
    ("jsonl-not-an-object", _tox("[1, 2]\n"), "prompts.jsonl, line 1: expected a JSON object, got list"),
    ("jsonl-no-text", _tox('{"txt": "a"}\n'), "prompts.jsonl, line 1: no prompt text"),
    ("jsonl-score-not-a-number", _tox('{"text": "a", "score": "high"}\n'),
     "prompts.jsonl, line 1: score must be a number or null, got 'high'"),
    ("jsonl-not-utf8", _tox(b'{"text": "a"}\n{"text": "caf\xe9"}\n'), "prompts.jsonl, line 2: not UTF-8 text"),
    ("jsonl-empty", _tox("\n\n"), "prompts.jsonl holds no records; expected one JSON object per line"),
    ("jsonl-val-split-too-few", _tox('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n', "--eval-split", "val"),
     "toxicity validation prompts are the last --limit N of the 3 prompts"),
    ("labels-bad-json", _labels(LABEL + '{"prompt": \n'), "finetune_truth.jsonl, line 2: not a label record"),
    ("labels-bad-completion", _labels(LABEL.replace(" yes", " maybe")),
     "finetune_truth.jsonl, line 1: completion must be ' yes' or ' no', got ' maybe'"),
    ("labels-not-utf8", _labels(LABEL.encode() + b'{"prompt": "Q: caf\xe9"}\n'),
            "finetune_truth.jsonl, line 2: not UTF-8"),
    ("kl-source-bad-json", _kl_source('{"text": "a"}\n{"text": \n'), "texts.jsonl, line 2: not valid JSON"),
]


@pytest.mark.parametrize(("setup", "expected"), _rows(DATA_FILES))
def test_corrupt_data_files_are_named_before_the_model_loads(setup: Setup, expected: str | list[str],
                                                             tiny_dir: Path, tmp_path: Path, no_model: None,
                                                             judge_cache: Path) -> None:
    args = setup(tmp_path)
    if args[0] == "run":
        args += ["--model", tiny_dir]
    assert_refused(_invoke(args), expected, tmp_path / "run")


def test_what_a_loader_reads_past(tmp_path: Path) -> None:
    """Not refused: a byte-order mark (CSV and JSONL), Windows line ends, empty parts of an answer cell."""
    from bench.data.jsonl import read_jsonl
    from bench.data.truthfulqa import load_truthfulqa

    for name, text in (("bom", "\ufeff" + GOOD_CSV), ("crlf", GOOD_CSV.replace("\r\n", "\n").replace("\n", "\r\n")),
                       ("empty-parts", _with_row("Adversarial,Test,Why?,Yes,Yes;; ;,No;,test\r\n"))):
        _write(tmp_path / name / "truthfulqa" / "TruthfulQA.csv", text)
        qs, _ = load_truthfulqa(tmp_path / name, use_hub=False)
        assert qs[0].question in ("What is fact 0?", "Why?") and len(qs) in (12, 13), name
    assert load_truthfulqa(tmp_path / "empty-parts", use_hub=False)[0][0].correct == ("Yes.",)
    path = _write(tmp_path / "bom.jsonl", "\ufeff" + '{"text": "a"}\n')
    assert list(read_jsonl(path)) == [(1, {"text": "a"})]


# --------------------------------------------------------------------------- C: compare / table misuse

@pytest.fixture(scope="module")
def finished(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of run folders: ``a`` (a finished truthfulqa-mc run) and edited copies of it."""
    root = tmp_path_factory.mktemp("runs")
    _write(root / "data" / "truthfulqa" / "TruthfulQA.csv", GOOD_CSV)
    r = _invoke(["run", "--method", "none", "--task", "truthfulqa-mc", "--model", tiny_dir, "--data-dir",
                 root / "data", "--limit", 12, "--output", root / "a"])
    assert r.exit_code == 0, r.output
    _variant(root, "other-data", lambda res: res["data"].update(checksum="0" * 64, n_questions=10))
    _variant(root, "future", lambda res: res.update(schema_version=99))
    _variant(root, "toxicity", _as_toxicity, lambda rec: {"index": rec["index"], "max_toxicity": 0.5})
    _variant(root, "gen", lambda res: res["config"].update(task="truthfulqa-gen"),
             lambda rec: {"index": rec["index"], "true": 1.0, "info": 1.0})
    shutil.copytree(root / "a", root / "damaged")
    (root / "damaged" / "results.json").write_text('{"config": ')
    shutil.copytree(root / "a", root / "torn")
    (root / "torn" / "per_question.jsonl.gz").write_bytes((root / "a" / "per_question.jsonl.gz").read_bytes()[:40])
    (root / "not-a-run").mkdir()
    return root


def _as_toxicity(res: dict) -> None:
    res["config"]["task"] = "toxicity"
    res["data"] = {"prompts": "challenging_rtp.jsonl", "n_prompts": 12, "checksum": "1" * 64}


def _variant(root: Path, name: str, edit: Callable[[dict], None],
             record: Callable[[dict], dict] | None = None) -> None:
    """A copy of run ``a`` with its results.json (and, given ``record``, its per-question records) edited."""
    shutil.copytree(root / "a", root / name)
    res = json.loads((root / name / "results.json").read_text())
    edit(res)
    (root / name / "results.json").write_text(json.dumps(res))
    if record is not None:
        path = root / name / "per_question.jsonl.gz"
        recs = [json.loads(x) for x in gzip.decompress(path.read_bytes()).decode().splitlines()]
        path.write_bytes(gzip.compress("".join(json.dumps(record(x)) + "\n" for x in recs).encode()))


REPORTS = [
    ("compare-not-a-run", ["compare", "{r}/not-a-run", "{r}/a"], "no per_question.jsonl.gz in {r}/not-a-run: not a "
                                                                  "finished run folder"),
    ("compare-nowhere", ["compare", "{r}/a", "{r}/nowhere"], "no per_question.jsonl.gz in {r}/nowhere"),
    ("compare-one-run", ["compare", "{r}/a"], "Missing argument 'run_b'"),
    ("compare-other-data", ["compare", "{r}/a", "{r}/other-data"],
     ["{r}/a and {r}/other-data were made on different data", "--task truthfulqa-mc, 12 questions",
      "--task truthfulqa-mc, 10 questions"]),
    ("compare-other-task", ["compare", "{r}/a", "{r}/toxicity"],
     ["were made on different data", "--task toxicity, 12 prompts"]),
    ("compare-no-common-metric", ["compare", "{r}/a", "{r}/gen"],
     "{r}/a (--task truthfulqa-mc) and {r}/gen (--task truthfulqa-gen) have no per-question metric in common"),
    ("compare-future-schema", ["compare", "{r}/a", "{r}/future"],
     "{r}/future/results.json: results format version 99, but this bench reads versions up to 1"),
    ("compare-damaged-results", ["compare", "{r}/damaged", "{r}/a"], "{r}/damaged/results.json is not valid JSON"),
    ("compare-torn-records", ["compare", "{r}/a", "{r}/torn"], "{r}/torn/per_question.jsonl.gz cannot be read"),
    ("compare-confidence", ["compare", "{r}/a", "{r}/a", "--confidence", "1.5"],
     "--confidence must lie in (0, 1), e.g. 0.95; got 1.5"),
    ("table-glob-matches-nothing", ["table", "{r}/nomatch*", "--output", "{r}/tables"],
     "no results found for ['{r}/nomatch*']"),
    ("table-not-a-run", ["table", "{r}/not-a-run", "--output", "{r}/tables"], "no results.json at {r}/not-a-run"),
    ("table-future-schema", ["table", "{r}/future", "--output", "{r}/tables"], "results format version 99"),
    ("table-damaged-results", ["table", "{r}/damaged", "--output", "{r}/tables"],
            "{r}/damaged/results.json is not valid JSON"),
]


@pytest.mark.parametrize(("args", "expected"), _rows(REPORTS))
def test_compare_and_table_refuse_what_they_cannot_pair_or_read(args: list[str], expected: str | list[str],
                                                                finished: Path) -> None:
    fill = [a.replace("{r}", str(finished)) for a in args]
    expected = [e.replace("{r}", str(finished)) for e in _parts(expected)]
    assert_refused(_invoke(fill), expected)
    assert not (finished / "tables").exists()


# --------------------------------------------------------------------------- D: other commands

SWEEP = ["sweep", "--method", "florain", "--model", "{model}", "--data-dir", "{r}/data", "--output", "{tmp}/sweep",
         "--no-plot", "--no-compile"]
COMMANDS = [
    ("methods-show-unknown", ["methods", "show", "nosuch"], "unknown method 'nosuch'; known methods: caa, few-shot"),
    ("models-pull-unknown", ["models", "pull", "nosuch"], "unknown model alias 'nosuch'; known aliases: llama-7b"),
    ("models-pull-hub-model", ["models", "pull", "llama-7b"], "llama-7b is not an embedded model"),
    ("sweep-unknown-param", [*SWEEP, "--param", "nosuch", "--values", "1,2"],
     "florain has no parameter 'nosuch'; valid: layer, rank, alpha"),
    ("sweep-unknown-method", [*SWEEP, "--method", "nosuch", "--param", "lam", "--values", "1,2"],
     "unknown method 'nosuch'"),
    ("sweep-grid-word", [*SWEEP, "--param", "lam", "--values", "1,abc"],
     "cannot read 'abc' in the grid '1,abc': use numbers, A-B or A-B:STEP"),
    ("sweep-grid-backwards", [*SWEEP, "--param", "lam", "--values", "5-1"],
     "the range '5-1' needs A ≤ B and a positive step"),
    ("sweep-grid-empty-item", [*SWEEP, "--param", "lam", "--values", "1,,2"], "empty item in the grid '1,,2'"),
    ("sweep-grid-not-whole", [*SWEEP, "--param", "rank", "--values", "1.5"], "1.5 is not a whole number"),
    ("sweep-a-choice", [*SWEEP, "--param", "extrapolation", "--values", "1"],
     "extrapolation is a choice (raw, unit), not a number to sweep"),
    ("sweep-unknown-metric", [*SWEEP, "--param", "lam", "--values", "1,2", "--metric", "nosuch"],
     "metric 'nosuch' is not produced by --task truthfulqa-mc; available: mc1, mc2, mc3"),
    ("sweep-bad-fixed-option", [*SWEEP, "--param", "lam", "--values", "1,2", "-O", "rank=0"],
     "--method florain option rank must be ≥ 1, got 0"),
    ("sweep-fluency-without-text", [*SWEEP, "--param", "lam", "--values", "1,2", "--max-fluency-ratio", "2"],
     "--max-fluency-ratio needs generated text to read"),
    ("sweep-first-value-out-of-range", [*SWEEP, "--param", "lam", "--values", "0,1"],
     "--method florain option lam must be > 0, got 0"),
    ("sweep-later-value-out-of-range", [*SWEEP, "--param", "lam", "--values", "1,0"],
            "--method florain option lam must be > 0, got 0"),
    ("rejudge-not-a-run", ["judge", "rejudge", "{r}/not-a-run"], "{r}/not-a-run holds no finished run"),
    ("rejudge-mc-run", ["judge", "rejudge", "{r}/a", "--data-dir", "{r}/data"],
            "has no judged answers (task 'truthfulqa-mc'); nothing to re-judge"),
    ("rescore-not-a-run", ["toxicity", "rescore", "{r}/not-a-run"], "{r}/not-a-run holds no finished run"),
    ("plot-nothing", ["plot", "{r}/nomatch*", "--output", "{tmp}/plots"], "no results found for"),
    ("plot-not-a-run", ["plot", "{r}/not-a-run", "--output", "{tmp}/plots"], "no results.json at {r}/not-a-run"),
    ("plot-no-plottable-metric", ["plot", "{r}/a", "--output", "{tmp}/plots"],
     "nothing to plot: the runs have neither True/Info nor toxicity/fluency metrics"),
    ("validate-unknown-protocol", ["judge", "validate", "--protocol", "nosuch"],
     "unknown protocol(s) ['nosuch']; valid: deployment, new-questions"),
    ("validate-unknown-judge", ["judge", "validate", "--judge", "nosuch", "--data-dir", "{r}/data"],
     "unknown judge 'nosuch'; valid: embedded, hf, openai"),
    ("scorer-option-malformed", ["toxicity", "validate", "--option", "foo"],
     "--option 'foo': expected SCORER.KEY=VALUE"),
    ("regress-no-reference", ["regress", "--reference", "{tmp}/none.json", "--output", "{tmp}/regress"],
     "no regression reference at {tmp}/none.json"),
    ("layers-fold-out-of-range", ["layers", "--model", "{model}", "--data-dir", "{r}/data", "--fold", "5"],
            "--fold 5 out of range: valid 0..1"),
    ("layers-missing-model", ["layers", "--model", "./nowhere", "--data-dir", "{r}/data"],
            "--model ./nowhere: no such local folder"),
]


@pytest.mark.parametrize(("args", "expected"), _rows(COMMANDS))
def test_other_commands_refuse_bad_input(args: list[str], expected: str | list[str], finished: Path, tiny_dir: Path,
                                         tmp_path: Path, no_model: None, judge_cache: Path) -> None:
    def fill(text: str) -> str:
        return text.replace("{r}", str(finished)).replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_dir))

    expected = [fill(e) for e in _parts(expected)]
    assert_refused(_invoke([fill(a) for a in args]), expected, tmp_path / "sweep")
