"""``bench.perf``: the MC comparison, merging re-measured parts into ``perf.json`` (no model is run), and the
protocol part's fit carried from one code path to the other (the tiny model)."""

import json
from pathlib import Path

import pytest
import torch

from bench import perf


def _mc(seconds, mc1, mc2, **extra):
    return {"questions": len(mc1), "answers": 3 * len(mc1), "batch_size": 4, "seconds": seconds,
            "per_question": {"mc1": mc1, "mc2": mc2}, **extra}


def test_compare_mc_reports_speedup_and_largest_per_question_difference():
    ours = _mc(10.0, [1.0, 0.0, 1.0], [0.5, 0.25, 0.75])
    theirs = _mc(105.0, [1.0, 0.0, 1.0], [0.5, 0.25, 0.75 + 3e-5])
    c = perf.compare_mc(ours, theirs)
    assert c["speedup"] == pytest.approx(10.5)
    assert c["ours"] == {"mc1": pytest.approx(2 / 3), "mc2": pytest.approx(0.5)}
    assert c["max_abs_diff_question"] == pytest.approx(3e-5)
    assert c["max_abs_diff_mean"] == pytest.approx(1e-5)


def test_rerunning_one_part_keeps_the_others_and_stamps_each(tmp_path, monkeypatch):
    calls = []

    def fake_run_part(name, **kwargs):
        calls.append(name)
        seconds = {"mc_ours": 12.0 if len(calls) > 2 else 10.0, "mc_lmeval": 100.0}[name]
        return {**_mc(seconds, [1.0, 0.0], [0.6, 0.4], lm_eval_version="x"), "peak_rss_mb": 1.0}

    monkeypatch.setattr(perf, "run_part", fake_run_part)
    perf.main(["--parts", "mc", "--output", str(tmp_path)])
    first = json.loads((tmp_path / "perf.json").read_text())["parts"]
    assert set(first) == {"mc_ours", "mc_lmeval"} and "10.0×" in (tmp_path / "perf.md").read_text()
    perf.main(["--parts", "mc-ours", "--output", str(tmp_path)])
    second = json.loads((tmp_path / "perf.json").read_text())["parts"]
    assert calls == ["mc_ours", "mc_lmeval", "mc_ours"]
    assert second["mc_lmeval"] == first["mc_lmeval"]  # not rerun: kept as measured
    assert second["mc_ours"]["seconds"] == 12.0 and "--parts mc-ours" in second["mc_ours"]["command"]
    assert "8.3×" in (tmp_path / "perf.md").read_text()
    with pytest.raises(SystemExit):
        perf.main(["--parts", "bogus", "--output", str(tmp_path)])


def test_the_scorer_never_feeds_an_answers_last_token_and_the_work_counter_sees_it():
    from bench.scoring import Encoded, answer_logprobs
    from tiny_models import tiny_model

    lm = tiny_model("llama", seed=0)
    seqs = [Encoded(list(range(5, 17)), [9, 10, 11]), Encoded(list(range(5, 15)), [7, 8, 9])]  # 12 and 10 tokens
    with perf.counted_work(lm) as plain:
        ref = answer_logprobs(lm, seqs, batch_size=2, prefix_cache=False)
    # one batch padded to the longer row, which stops before its last answer token (11 of 12 positions); logits
    # from the first position that predicts an answer token (6, for the second row) to the end (11 - 6 = 5 each)
    assert (plain["forward_passes"], plain["tokens"], plain["logit_rows"]) == (1, 2 * 11, 2 * 5)
    assert plain["attention_pairs"] == 2 * 11 * 11 and plain["flops"] > 0
    with perf.counted_work(lm) as cached:
        got = answer_logprobs(lm, seqs, batch_size=2, prefix_cache=True)
    assert got == pytest.approx(ref, abs=1e-5)  # the same scores, computing less
    assert cached["tokens"] < plain["tokens"] and cached["flops"] < plain["flops"]


def test_the_work_counter_counts_only_the_layers_a_resumed_kl_pass_runs():
    from baselines.shift import AdditiveShift
    from bench.interventions import Intervention
    from bench.tasks.kl_ce import kl_ce
    from tiny_models import tiny_model

    lm = tiny_model("llama", seed=0, n_layers=4)
    heads, dim = lm.spec.site_shape("heads")
    iv = Intervention("mean-shift", "heads", {2: AdditiveShift(torch.ones(heads, dim))}, {})
    windows = torch.randint(5, 40, (2, 16))
    with perf.counted_work(lm) as work:
        kl_ce(lm, windows, iv, batch_size=2)
    # the unintervened pass runs all 4 layers over 2 × 16 tokens, the intervened one layers 2 and 3 only
    assert work["forward_passes"] == 2 and work["tokens"] == 32 + 16
    assert work["attention_pairs"] == 2 * 16 * 16 * 1.5 and work["logit_rows"] == 2 * 2 * 16


def test_decode_section_shows_both_bounds_and_reads_older_measurements():
    row = {"generate_tok_s": 40.0, "decode_tok_s": 80.0, "bandwidth_bound_tok_s": 800.0, "compute_bound_tok_s": 160.0,
           "bound_tok_s": 160.0, "fraction_of_bound": 0.5}
    d = {"new_tokens": 50, "layer": 15, "rounds": 2, "bandwidth_gb_s": 38.0, "matmul_gflop_s": 150.0, "threads": 2,
         "weight_mb": 538.0, "batch_32": row, "command": "python -m bench.perf --parts decode", "git": {"commit": "abc"},
         "finished": "2026-12-03T07:00:00"}
    text = "\n".join(perf._decode_lines(d))
    assert "| 32 | 40.0 | 80.0 | 2.00× | 800 | 160 | 50 % |" in text and "150 GFLOP/s on 2 threads" in text
    assert "each row's KV cache" in text  # measured before the shared prefix was held once
    later = {**d, "shared_prefix_tokens": 219, "batch_128": {**row, "generate_tok_s": None, "decode_tok_s": 120.0,
                                                              "fraction_of_bound": 0.75}}
    text = "\n".join(perf._decode_lines(later))
    assert "| 128 | not run | 120.0 |  | 800 | 160 | 75 % |" in text and "the shared prefix's KV cache once" in text
    old = {k: v for k, v in d.items() if k not in ("matmul_gflop_s", "threads")}
    old["batch_32"] = {"generate_tok_s": 40.0, "decode_tok_s": 80.0, "bound_tok_s": 800.0, "fraction_of_bound": 0.1}
    assert "| 32 | 40.0 | 80.0 | 2.00× | 800 | 10 % |" in "\n".join(perf._decode_lines(old))


def test_protocol_paths_share_one_fit_and_the_second_reuses_it(tiny_dir, tqa_dir, tmp_path):
    """The protocol part fits a method once: the second path's run starts from the first's fits (identity
    marker, fit records, saved interventions), reuses them, and scores with the same edit."""
    from bench.runner import RunConfig, run

    said: list[str] = []
    common = dict(method="mean-shift", model=str(tiny_dir), task="truthfulqa-mc", layer=1, folds=2, limit=12)
    first = run(RunConfig(**common), tmp_path / "current", str(tqa_dir), echo=lambda m: None)
    assert not perf.carry_fits(tmp_path / "nothing", tmp_path / "x")  # no run there: nothing carried
    assert perf.carry_fits(tmp_path / "current", tmp_path / "legacy")
    carried = sorted(p.name for p in (tmp_path / "legacy").iterdir())
    assert carried == ["fold_0.fit.json", "fold_1.fit.json", "intervention_fold0", "intervention_fold1",
                       "run_config.json"]
    second = run(RunConfig(**common, legacy_paths=True), tmp_path / "legacy", str(tqa_dir), resume=True,
                 echo=said.append)
    assert sum("reusing the fitted mean-shift" in m for m in said) == 2 and not any("fitted mean-shift at" in m for m in said)
    for a, b in zip(first["folds"], second["folds"]):
        assert a["timings"]["fit_s"] == b["timings"]["fit_s"]  # the recorded fit, not a new one
    assert first["metrics"]["mc2"]["mean"] == pytest.approx(second["metrics"]["mc2"]["mean"], abs=1e-6)


def test_fit_parts_run_on_a_model_without_a_paper_layer(tiny_dir, tqa_dir):
    """A model with no paper layer (chosen per fold in runs) is timed at its middle layer, by both fit parts."""
    batched = perf.part_fit_batched(str(tiny_dir), str(tqa_dir), 12, epochs=1, compile=False)
    loop = perf.part_fit_loop(str(tiny_dir), str(tqa_dir), 12, epochs=1)
    assert batched["layer"] == loop["layer"] == 1  # the tiny Llama's 2 layers // 2
    assert batched["train_samples"] > 0 and loop["seconds"] > 0


def test_protocol_section_shows_a_shared_fit_once_and_keeps_it_out_of_the_ratio():
    folds = [{"mc_s": 10.0, "gen_s": 20.0, "fluency_s": 3.0, "klce_s": 4.0, "eval_s": 37.0, "fit_s": 100.0}] * 2
    fast = [{**f, "gen_s": 5.0, "eval_s": 22.0} for f in folds]
    metrics = {"true": {"mean": 0.5}, "mc2": {"mean": 0.4}}
    common = {"method": "florain", "limit": None, "metrics": metrics, "answers": {"0": "Yes."}, "command": "x",
              "finished": "2026-12-03T10:00:00", "git": {"commit": "abc"}}
    parts = {"protocol_florain": {**common, "legacy": False, "folds": fast, "fit_reused": False, "gen_batch_size": 64},
             "protocol_florain_legacy": {**common, "legacy": True, "folds": folds, "fit_reused": True,
                                         "gen_batch_size": 16}}
    text = "\n".join(perf._protocol_lines(parts))
    assert "| eval | 74.0 | 44.0 | 1.68× |" in text
    assert "| fit (once, by the current path; the other evaluated the same fitted edit) | 200.0 | 200.0 | |" in text
    assert "earlier 16, current 64" in text
    assert "KL/CE windows: 100)" in text  # measurements that predate the option ran the default
    assert "answers per scoring pass: earlier 16, current 16" in text  # measured before the scorer had its own
    parts = {k: {**v, "kl_windows": 20, "limit": 60, "score_batch_size": 16 if v["legacy"] else 32}
             for k, v in parts.items()}
    assert ("### florain (limit: 60; generation batch: earlier 16, current 64; answers per scoring pass: earlier 16, "
            "current 32; KL/CE windows: 20)") in perf._protocol_lines(parts)


def test_kl_windows_reach_the_protocol_steps_and_bad_values_are_refused():
    args, _, _ = perf._arguments(["--parts", "protocol", "--kl-windows", "20"])
    steps = perf._step_arguments(args, Path("fits"))
    assert {steps[f"protocol_{m}{s}"]["kl_windows"] for m in perf.PROTOCOL_METHODS for s in ("", "_legacy")} == {20}
    with pytest.raises(SystemExit):
        perf._arguments(["--kl-windows", "0"])


def test_protocol_section_splits_the_judge_off_and_bounds_the_speedup_by_the_arithmetic():
    folds = [{"mc_s": 10.0, "gen_s": 24.0, "judge_s": 4.0, "fluency_s": 3.0, "klce_s": 3.0, "eval_s": 40.0,
              "fit_s": 0.0}] * 2
    fast = [{**f, "gen_s": 9.0, "eval_s": 25.0} for f in folds]
    work = lambda tf: {p: {"flops": tf * 1e12} for p in ("mc", "gen", "fluency", "klce")}  # noqa: E731
    common = {"method": "none", "limit": None, "metrics": {"mc2": {"mean": 0.4}}, "answers": {"0": "Yes."},
              "command": "x", "finished": "2026-12-03T10:00:00", "git": {"commit": "abc"}, "fit_reused": False}
    parts = {"protocol_none": {**common, "legacy": False, "folds": fast, "work": work(0.5), "matmul_gflop_s": 100.0},
             "protocol_none_legacy": {**common, "legacy": True, "folds": folds, "work": work(1.0),
                                      "matmul_gflop_s": 100.0}}
    text = "\n".join(perf._protocol_lines(parts))
    # decoding alone: 2 × (24 - 4) = 40 s earlier, 2 × (9 - 4) = 10 s current; 0.5 TFLOP in 10 s = 50 GFLOP/s,
    # 5 s at 100 GFLOP/s
    assert "| gen | 40.0 | 10.0 | 4.00× | 1.0 / 0.5 | 50 | 5.0 |" in text
    assert "| judge | 8.0 | 8.0 | 1.00× |  |  |  |" in text
    assert "| eval | 80.0 | 50.0 | 1.60× | 4.0 / 2.0 | 48 | 20.0 |" in text  # 2 TFLOP in 50 - 8 s
    # 2 TFLOP at 100 GFLOP/s = 20 s, plus the judge's 8 s: 80 s could become 28 s at best
    assert "takes about 20 s, and the judge took 8 s" in text and "**2.86×**" in text
    # an earlier measurement without the judge's share: gen is compared whole on both sides, no judge row
    del parts["protocol_none_legacy"]["folds"]
    parts["protocol_none_legacy"]["folds"] = [{k: v for k, v in f.items() if k != "judge_s"} for f in folds]
    text = "\n".join(perf._protocol_lines(parts))
    assert "| gen | 48.0 | 18.0 | 2.67× |" in text and "| judge |" not in text


def test_counted_parts_counts_each_parts_model_work_and_restores_the_parts(tiny_dir, tqa_dir, tmp_path):
    from bench.runner import RunConfig, run
    from bench.tasks.base import PARTS

    before = dict(PARTS)
    work: dict = {}
    with perf.counted_parts(work):
        run(RunConfig(method="none", model=str(tiny_dir), task="truthfulqa-mc", folds=2, limit=8),
            tmp_path / "run", str(tqa_dir), echo=lambda m: None)
    assert set(work) == {"mc"} and work["mc"]["forward_passes"] > 0 and work["mc"]["flops"] > 0
    assert PARTS == before
