"""The progress helper: a plain line on stderr at most every BENCH_PROGRESS_SECONDS when stderr is not a terminal."""

from __future__ import annotations

import pytest

from bench.progress import LogLines, progress_bar


def test_log_lines_say_count_share_time_left_and_fields():
    lines: list[str] = []
    log = LogLines("LoFiT (DPO) stage 1 fold 0", 4, " batches", 0.0, lines.append)
    log.start -= 90  # 90 s into the loop: 1 of 4 steps done leaves about 270 s
    log.advance(1, loss=0.6931)
    log.advance(3, loss=0.5)
    assert lines[0].startswith("LoFiT (DPO) stage 1 fold 0: 1/4 batches (25 %), 1m30s elapsed, about 4m30s left")
    assert lines[0].endswith("loss 0.6931")
    assert lines[1].startswith("LoFiT (DPO) stage 1 fold 0: 4/4 batches (100 %)") and "left" not in lines[1]


def test_log_lines_wait_for_the_interval():
    lines: list[str] = []
    log = LogLines("fit", 1000, " epochs", 3600.0, lines.append)
    for _ in range(1000):
        log.advance()
    assert lines == [] and log.done == 1000


def test_a_log_file_gets_plain_lines_on_stderr_and_no_label_gets_nothing(monkeypatch, capsys):
    monkeypatch.setenv("BENCH_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # what rich reads first: not a terminal, whatever runs the tests
    with progress_bar("fold 0 generation [x]", 2, " questions") as advance:
        advance(2)
    with progress_bar(None, 2) as advance:
        advance(2)
    out = capsys.readouterr()
    assert out.out == ""  # stdout stays for results (tables, JSON)
    assert out.err.splitlines() == ["fold 0 generation [x]: 2/2 questions (100 %), 0m00s elapsed"]


@pytest.mark.parametrize("raw", ["a minute", "-5", "nan", "inf"])
@pytest.mark.parametrize("terminal", ["0", "1"])
def test_a_bad_interval_is_refused_with_what_is_valid_on_every_output(raw, terminal, monkeypatch):
    monkeypatch.setenv("BENCH_PROGRESS_SECONDS", raw)
    monkeypatch.setenv("TTY_COMPATIBLE", terminal)
    with pytest.raises(ValueError, match=f"BENCH_PROGRESS_SECONDS must be a number of seconds ≥ 0, got '{raw}'"):
        with progress_bar("fit", 3):
            pass
