"""HF_HUB_OFFLINE (bench.hub): the KL/CE texts never ask the Hub when it is set, and an unreachable Hub costs one
request, not huggingface_hub's ~25 s of retries. Needs the shared data (fails, never skips, when it is missing)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from bench.hub import OFFLINE_VARIABLES, hub_offline, hub_unreachable, offline_variable
from bench.tasks import kl_ce
from bench.tasks.kl_ce import HUB_TEXTS, load_texts

SEED = 3


@pytest.fixture()
def data_dir(shared_data: Path) -> Path:
    path = shared_data / "toxicity" / "rtp_nontoxic_5k.jsonl"
    assert path.is_file(), f"shared data missing: {path}; set BENCH_DATA_DIR to the folder holding toxicity/"
    return shared_data


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No offline variable set, an empty Hub cache, and no dataset loading or Hub probe unless a test allows it."""
    import datasets
    import huggingface_hub.constants

    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def forbidden(*args, **kwargs):
        raise AssertionError("the Hub must not be asked here")

    monkeypatch.setattr(datasets, "load_dataset", forbidden)
    monkeypatch.setattr(kl_ce, "hub_unreachable", forbidden)


def offline_texts(data_dir: Path) -> tuple[list[str], str]:
    return load_texts("nontoxic", data_dir, SEED)


@pytest.mark.parametrize(("name", "value"), [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"),
                                             ("HF_DATASETS_OFFLINE", "YES"), ("HF_HUB_OFFLINE", "on"),
                                             ("TRANSFORMERS_OFFLINE", "1")])
def test_auto_source_offline_skips_the_hub(data_dir: Path, monkeypatch, caplog, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="bench.tasks.kl_ce"):
        texts, source = load_texts(None, data_dir, SEED)
    assert time.perf_counter() - start < 5
    assert (texts, source) == offline_texts(data_dir) and source.endswith("rtp_nontoxic_5k.jsonl")
    assert f"{name} is set" in caplog.text and "offline 'nontoxic' texts" in caplog.text


def test_explicit_hub_source_offline_is_a_clear_error(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        load_texts("hub", data_dir, SEED)
    message = str(err.value)
    for fragment in ("HF_HUB_OFFLINE is set", HUB_TEXTS, "not in the local Hugging Face cache", "nontoxic, toxic, "
                     "challenging", "JSONL file", "--kl-source"):
        assert fragment in message, message


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                                ("0", False), ("false", False), ("", False), ("no", False)])
def test_offline_values(monkeypatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert hub_offline() is offline
    assert offline_variable() == ("HF_DATASETS_OFFLINE" if offline else None)
    assert offline_variable(("HF_HUB_OFFLINE",)) is None  # the models' check ignores the datasets switch


def test_cached_texts_are_used_offline(data_dir: Path, monkeypatch) -> None:
    """HF_HUB_OFFLINE means "local cache only": a cached openwebtext-10k is read; a broken cache falls back."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(kl_ce, "cached", lambda repo, filename, repo_type: repo == HUB_TEXTS)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [{"text": f"text {i}"} for i in range(5)])
    texts, source = load_texts(None, data_dir, SEED)
    assert source == f"hub:{HUB_TEXTS}" and sorted(texts) == [f"text {i}" for i in range(5)]

    def broken(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    assert load_texts(None, data_dir, SEED) == offline_texts(data_dir)
    with pytest.raises(RuntimeError, match="could not load stas/openwebtext-10k from the Hub"):
        load_texts("hub", data_dir, SEED)


def test_unreachable_hub_falls_back_without_retries(data_dir: Path, monkeypatch, caplog) -> None:
    """Not offline, nothing cached, the probe fails: the texts fall back at once (explicit ``hub``: an error)."""
    monkeypatch.setattr(kl_ce, "hub_unreachable", lambda repo, repo_type: "ConnectError: [Errno -2] no network")
    with caplog.at_level("INFO", logger="bench.tasks.kl_ce"):
        assert load_texts(None, data_dir, SEED) == offline_texts(data_dir)
    assert "the Hugging Face Hub cannot be reached (ConnectError" in caplog.text
    with pytest.raises(RuntimeError, match=r"not available: the Hugging Face Hub cannot be reached.*nontoxic"):
        load_texts("hub", data_dir, SEED)


def test_probe_is_one_quick_request() -> None:
    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.perf_counter()
    why = hub_unreachable(HUB_TEXTS, "dataset", timeout=2.0, endpoint=endpoint)
    assert why and "Connect" in why and time.perf_counter() - start < 2


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_reproduce_names_the_offline_switch(monkeypatch, name: str) -> None:
    from bench.reproduce import _hub_status

    monkeypatch.setenv(name, "yes")
    assert _hub_status("huggyllama/llama-7b") == f"not in the local Hugging Face cache, and {name} is set"
