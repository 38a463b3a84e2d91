from pathlib import Path

import numpy as np
import pytest

from bench.data.truthfulqa import DataNotFoundError, checksum, close_answer, load_truthfulqa, make_folds, split_answers


def test_answers_split_and_closed_like_truthfulqa():
    assert split_answers(" Yes; no.;  ; It is 3 ") == ("Yes.", "no.", "It is 3.")
    assert close_answer("  Paris ") == "Paris."
    assert close_answer("Paris.") == "Paris."


def test_loads_from_data_dir(tqa_dir):
    qs, source = load_truthfulqa(tqa_dir, use_hub=False)
    assert len(qs) == 12 and source.endswith("TruthfulQA.csv")
    assert qs[3].correct == ("Fact 3 is true.", "It is true.", "Yes, fact 3.")
    assert qs[3].best_answer == "Fact 3 is true."


def test_env_var_is_the_second_place(tqa_dir, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tqa_dir))
    qs, _ = load_truthfulqa(None, use_hub=False)
    assert len(qs) == 12


def test_missing_data_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as err:
        load_truthfulqa(tmp_path / "cli", use_hub=False)
    msg = str(err.value)
    assert str(tmp_path / "cli") in msg and str(tmp_path / "env") in msg and "TruthfulQA.csv" in msg


def test_data_locator_searches_the_data_dir_then_the_env_var_root_by_root(tmp_path, monkeypatch):
    from bench.paths import find_data_file

    cli, env = tmp_path / "cli", tmp_path / "env"
    (env / "sub").mkdir(parents=True)
    (env / "sub" / "f.txt").write_text("x")
    monkeypatch.setenv("BENCH_DATA_DIR", str(env))
    found, tried = find_data_file(cli, "f.txt", Path("sub") / "f.txt")
    assert found == env / "sub" / "f.txt"
    assert tried == [cli / "f.txt", cli / "sub" / "f.txt", env / "f.txt", env / "sub" / "f.txt"]
    monkeypatch.delenv("BENCH_DATA_DIR")
    assert find_data_file(None, "f.txt") == (None, [])


def test_malformed_csv_says_what_was_expected(tmp_path):
    (tmp_path / "TruthfulQA.csv").write_text("Question,Answer\nWhy?,Because\n")
    with pytest.raises(ValueError, match="missing column"):
        load_truthfulqa(tmp_path, use_hub=False)


def test_folds_match_iti_split():
    folds = make_folds(817, 2, 0.2, seed=42)
    assert folds[0].test == tuple(range(409)) and folds[1].test == tuple(range(409, 817))
    # ITI: np.random.seed(42) once, then np.random.choice per fold, in order
    np.random.seed(42)
    for f, block in zip(folds, np.array_split(np.arange(817), 2)):
        rest = np.setdiff1d(np.arange(817), block)
        train = np.random.choice(rest, size=int(len(rest) * 0.8), replace=False)
        assert f.train == tuple(sorted(train.tolist()))
        assert set(f.val) == set(rest.tolist()) - set(train.tolist())
        assert not set(f.train) & set(f.test) and not set(f.val) & set(f.test)


def test_folds_reject_bad_input():
    with pytest.raises(ValueError):
        make_folds(1, 2)
    with pytest.raises(ValueError):
        make_folds(10, 1)


def test_shared_truthfulqa_is_complete(shared_data):
    qs, _ = load_truthfulqa(shared_data, use_hub=False)
    assert len(qs) == 817
    assert all(q.correct and q.incorrect and q.best_answer.endswith(".") for q in qs)
    assert len(checksum(qs)) == 64
