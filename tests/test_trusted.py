"""Nothing executable from the cache: a pickle planted where the embedded judge or toxicity scorer is cached is
never unpickled (its code does not run); the judge and scorer refuse it with a message that says what to do."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from bench import trusted


class _Payload:
    """Unpickling this writes a marker file: the proof that a planted file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture()
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENCH_KEY_FILE", str(tmp_path / "key" / "cache.key"))
    return tmp_path / "key" / "cache.key"


def test_signed_files_load_and_anything_else_is_refused_unread(tmp_path, key):
    good = tmp_path / "c" / "obj.joblib"
    good.parent.mkdir()
    trusted.dump({"a": 1}, good)
    assert trusted.load(good) == {"a": 1} and key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
    marker = tmp_path / "ran"
    _plant(tmp_path / "c" / "planted.joblib", marker)
    with pytest.raises(trusted.UntrustedCacheError, match="has no signature: it was not written by this installation"):
        trusted.load(tmp_path / "c" / "planted.joblib")
    # a signature copied from a good file does not cover another file's bytes
    (tmp_path / "c" / "planted.joblib.sig").write_text((tmp_path / "c" / "obj.joblib.sig").read_text())
    with pytest.raises(trusted.UntrustedCacheError, match="does not match its signature"):
        trusted.load(tmp_path / "c" / "planted.joblib")
    assert not marker.exists()


def test_a_cache_signed_under_another_key_is_not_trusted(tmp_path, key, monkeypatch):
    path = tmp_path / "obj.joblib"
    trusted.dump([1, 2], path)
    monkeypatch.setenv("BENCH_KEY_FILE", str(tmp_path / "other.key"))  # another user or machine
    with pytest.raises(trusted.UntrustedCacheError, match="Delete .* and retrain"):
        trusted.load(path)


def test_the_judge_refuses_a_planted_featurizer_without_running_it(tmp_path, key, judge_cache):
    from bench.judges.embedded import CODE_SHA256, EmbeddedJudge, judge_dir

    marker = tmp_path / "ran"
    folder = judge_dir()
    _plant(folder / "featurizer.joblib", marker)
    for name in ("truth", "info"):
        _plant(folder / f"{name}.joblib", marker)
    (folder / "meta.json").write_text(json.dumps({"version": "embedded-v2", "code_sha256": CODE_SHA256}))
    with pytest.raises(FileNotFoundError, match="holds a file this installation did not write, which is never "
                                                "unpickled.*run `bench judge train`"):
        EmbeddedJudge(train_if_missing=False)
    assert not marker.exists()


def test_the_toxicity_scorer_refuses_a_planted_model_without_running_it(tmp_path, key, judge_cache):
    import sklearn

    from bench.toxicity import embedded
    from bench.toxicity.base import ScorerNotAvailableError

    marker = tmp_path / "ran"
    folder = embedded.default_dir()
    _plant(folder / "model.joblib", marker)
    meta = {"version": embedded.SCORER_VERSION, "sklearn_version": sklearn.__version__,
            "profanity_check_version": embedded._package_version("alt-profanity-check")}
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert embedded.is_current(embedded.read_metadata(folder))  # only the signature stands in the way
    with pytest.raises(ScorerNotAvailableError, match="did not write, which is never unpickled.*bench toxicity train"):
        embedded.load_embedded(folder, auto_train=False)
    assert not marker.exists()
