import json

import pytest

from bench.runs import combine_folds, summarise
from bench.tables import load_results, long_table, reference_comparison, wide_table, write_tables


def _fake_run(tmp_path, name, model, method, mc2_values_per_fold):
    folds = [{"fold": i, "metrics": {"mc2": summarise(v)}} for i, v in enumerate(mc2_values_per_fold)]
    res = {"config": {"model": model, "method": method, "task": "truthfulqa-mc", "layer": None},
           "metrics": {"mc2": combine_folds([f["metrics"]["mc2"] for f in folds])}, "folds": folds}
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_fold_combination_and_standard_errors():
    s = summarise([0.0, 1.0, 1.0, 0.0])
    assert s["mean"] == 0.5 and s["se"] == pytest.approx(0.5773502 / 2, rel=1e-5) and s["n"] == 4
    c = combine_folds([{"mean": 0.4, "se": 0.03, "n": 10}, {"mean": 0.6, "se": 0.04, "n": 12}])
    assert c["mean"] == pytest.approx(0.5) and c["se"] == pytest.approx(0.025) and c["n"] == 22


def test_table_rows_reference_difference_and_files(tmp_path):
    _fake_run(tmp_path, "a", "llama-7b", "iti", [[0.4, 0.5], [0.5, 0.6]])
    _fake_run(tmp_path, "b", "smollm2-135m", "none", [[0.1, 0.3], [0.2, 0.2]])
    results = load_results([str(tmp_path / "*")])
    long = long_table(results)
    assert set(long["method"]) == {"iti", "none"}
    comp = reference_comparison(long)
    row = comp[(comp["model"] == "llama-7b") & (comp["metric"] == "mc2")].iloc[0]
    assert row["ours"] == pytest.approx(0.5) and row["reference"] == pytest.approx(0.45)
    assert row["difference"] == pytest.approx(0.05) and "honest_llama" in row["source"]
    paths = write_tables(results, tmp_path / "out")
    md = paths["md"].read_text()
    assert "0.500 ± " in md and "Reference figures" in md
    assert "$\\pm$" in paths["tex"].read_text()
    assert len(paths["csv"].read_text().splitlines()) == 3


def test_missing_results_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results([str(tmp_path)])


def test_paired_differences_by_hand(tmp_path):
    from bench.tables import paired_differences

    for name, vals in (("a", [0.1, 0.2, 0.3, 0.4]), ("b", [0.2, 0.4, 0.3, 0.6])):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("per_question.jsonl").write_text(
            "\n".join(json.dumps({"index": i, "mc1": v, "mc2": v, "mc3": v}) for i, v in enumerate(vals)))
    df = paired_differences(tmp_path / "a", tmp_path / "b")
    row = df[df["metric"] == "mc2"].iloc[0]
    assert row["difference"] == pytest.approx(0.125) and row["questions"] == 4
    assert row["ci_low"] < 0.125 < row["ci_high"]


def test_paired_differences_per_prompt_skip_prompts_without_a_kept_perplexity(tmp_path):
    from bench.tables import paired_differences

    runs = {"a": ([0.9, 0.8, 0.7], [100.0, None, 120.0]), "b": ([0.5, 0.6, 0.3], [150.0, 90.0, 180.0])}
    for name, (tox, ppl) in runs.items():
        d = tmp_path / name
        d.mkdir()
        d.joinpath("per_question.jsonl").write_text("\n".join(
            json.dumps({"index": i, "max_toxicity": t, "mean_ppl": p}) for i, (t, p) in enumerate(zip(tox, ppl))))
    df = paired_differences(tmp_path / "a", tmp_path / "b").set_index("metric")
    assert df.loc["max_toxicity", "difference"] == pytest.approx(-1.0 / 3) and df.loc["max_toxicity", "questions"] == 3
    assert df.loc["mean_ppl", "difference"] == pytest.approx(55.0) and df.loc["mean_ppl", "questions"] == 2


def test_rows_go_by_model_then_method_with_the_unintervened_model_first(tmp_path):
    for name, model, method in [("m1", "smollm2-135m", "iti"), ("m2", "smollm2-135m", "florain"),
                                ("m3", "gemma3-270m", "florain"), ("m4", "smollm2-135m", "none"),
                                ("m5", "gemma3-270m", "none"), ("m6", "smollm2-135m", "my-method")]:
        _fake_run(tmp_path, name, model, method, [[0.4, 0.5], [0.5, 0.6]])
    wide = wide_table(long_table(load_results([str(tmp_path / "*")])))
    assert list(zip(wide["model"], wide["method"])) == [
        ("gemma3-270m", "none"), ("gemma3-270m", "florain"),
        ("smollm2-135m", "none"), ("smollm2-135m", "florain"), ("smollm2-135m", "iti"), ("smollm2-135m", "my-method")]


def test_question_counts_stay_with_their_rows(tmp_path):
    """Run directories load in path order (z-model first) but rows come out by model: counts follow their row."""
    _fake_run(tmp_path, "a", "z-model", "none", [[0.4, 0.5], [0.5, 0.6]])  # 4 questions
    _fake_run(tmp_path, "b", "a-model", "none", [[0.4, 0.5, 0.1], [0.5, 0.6, 0.2]])  # 6 questions
    wide = wide_table(long_table(load_results([str(tmp_path / "*")])))
    assert dict(zip(wide["model"], wide["questions"])) == {"a-model": 6, "z-model": 4}
