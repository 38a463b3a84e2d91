"""Reports: tables (means, standard errors, reference differences), plots, sweeps, reproduce-table1, regress."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.metrics import label
from bench.runs import combine_folds, summarise

runner = CliRunner()

# --------------------------------------------------------------------------- tables

TQA_FOLDS = {  # per fold: per-question values of each metric
    "mc1": ([1, 0, 0, 1], [0, 0, 1, 0]),
    "mc2": ([0.6, 0.4, 0.5, 0.7], [0.3, 0.5, 0.6, 0.4]),
    "true": ([1, 1, 0, 1], [1, 0, 0, 1]),
    "info": ([1, 1, 1, 0], [1, 1, 1, 1]),
    "ce": ([2.0, 2.2, 2.4, 2.6, 2.3, 2.3], [2.1, 2.3, 2.2, 2.0, 2.15, 2.15]),  # 6 text windows, not questions
    "kl": ([0.1, 0.2, 0.1, 0.2, 0.15, 0.15], [0.3, 0.1, 0.2, 0.2, 0.2, 0.2]),
}


def _write_run(root: Path, name: str, model: str, method: str, folds: dict[str, tuple[list, list]]) -> Path:
    """A results.json as the runner writes it: per-fold summaries combined over folds."""
    from bench.metrics.generation import combine_product, generation_metrics

    per_fold = []
    for k in range(2):
        m = {name_: summarise(vals[k]) for name_, vals in folds.items() if name_ not in ("true", "info")}
        if "true" in folds:
            m.update(generation_metrics([bool(x) for x in folds["true"][k]], [bool(x) for x in folds["info"][k]]))
        per_fold.append({"fold": k, "metrics": m})
    combined = {m: combine_folds([f["metrics"][m] for f in per_fold]) for m in per_fold[0]["metrics"]}
    if "true_info_product" in combined:
        combined["true_info_product"] = combine_product(combined["true"], combined["info"],
                                                        [f["metrics"]["true_info_product"] for f in per_fold])
    res = {"config": {"model": model, "method": method, "task": "truthfulqa", "layer": None},
           "judge": {"backend": "embedded"}, "metrics": combined, "folds": per_fold}
    d = root / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_table_means_standard_errors_and_reference_differences(tmp_path):
    from bench.tables import load_results, long_table, reference_comparison, wide_table, write_tables

    _write_run(tmp_path / "runs", "a", "llama-7b", "iti", TQA_FOLDS)
    _write_run(tmp_path / "runs", "b", "llama-7b", "none", {k: v for k, v in TQA_FOLDS.items() if k != "kl"})
    results = load_results([str(tmp_path / "runs" / "*")])
    long = long_table(results)
    row = long[(long["method"] == "iti") & (long["metric"] == "mc2")].iloc[0]
    f0, f1 = summarise(TQA_FOLDS["mc2"][0]), summarise(TQA_FOLDS["mc2"][1])
    assert row["mean"] == pytest.approx((0.55 + 0.45) / 2)  # mean of the fold means
    assert row["se"] == pytest.approx(math.sqrt(f0["se"] ** 2 + f1["se"] ** 2) / 2)
    tip = long[(long["method"] == "iti") & (long["metric"] == "true_info_product")].iloc[0]
    assert tip["mean"] == pytest.approx(((0.75 + 0.5) / 2) * ((0.75 + 1.0) / 2))  # product of fold-averaged rates
    tai = long[(long["method"] == "iti") & (long["metric"] == "true_and_info")].iloc[0]
    assert tai["mean"] == pytest.approx((0.5 + 0.5) / 2)  # share of answers both true and informative
    wide = wide_table(long)
    assert len(wide) == 2 and list(wide["method"]) == ["none", "iti"]  # one row per (model, method), none first
    for m in ("true_info_product", "true_and_info", "true", "info", "mc1", "mc2", "ce", "kl"):
        assert label(m) in wide.columns
    assert wide.loc[wide["method"] == "iti", label("mc2")].iloc[0] == f"0.500 ± {row['se']:.3f}"
    assert wide.loc[wide["method"] == "none", label("kl")].iloc[0] == ""  # absent metric: empty cell
    assert list(wide["questions"]) == [8, 8]  # questions, not the 12 KL/CE windows
    # a metric with nothing to score (answer NLL when every answer is empty) is "–", not "nan"
    nothing = long.assign(mean=long["mean"].where(long["metric"] != "mc1", math.nan))
    assert set(wide_table(nothing)[label("mc1")]) == {"–"}
    comp = reference_comparison(long)
    ce = comp[(comp["method"] == "iti") & (comp["metric"] == "ce")].iloc[0]
    assert ce["ours"] == pytest.approx(2.225) and ce["reference"] == pytest.approx(2.28)
    assert ce["difference"] == pytest.approx(2.225 - 2.28) and "honest_llama" in ce["source"]
    true_none = comp[(comp["method"] == "none") & (comp["metric"] == "true")]
    assert len(true_none) == 2 and set(true_none["reference"]) == {0.2115, 0.25}  # paper and ITI replication
    paths = write_tables(results, tmp_path / "out", "t1")
    md = paths["md"].read_text()
    assert "True*Info (product of rates)" in md and "Reference figures" in md and "-0.055" in md
    assert "\\pm" in paths["tex"].read_text() and "True∧Info" in paths["tex"].read_text()
    assert len(paths["csv"].read_text().splitlines()) == 1 + 8 + 7


def test_table_has_toxicity_columns_when_present(tmp_path):
    from bench.tables import load_results, long_table, wide_table

    tox = {"expected_max_toxicity": ([0.2, 0.4], [0.3, 0.5]), "toxicity_probability": ([0, 1], [1, 1]),
           "fluency_ppl": ([10.0, 12.0], [11.0, 13.0])}
    _write_run(tmp_path, "t", "gpt2", "florain", tox)
    wide = wide_table(long_table(load_results([str(tmp_path / "t")])))
    assert {"Exp. max toxicity", "Toxicity prob.", "Fluency (PPL)"} <= set(wide.columns)
    assert wide["Exp. max toxicity"].iloc[0].startswith("0.350 ± ")


# --------------------------------------------------------------------------- plots


def _m(mean: float, se: float = 0.02, n: int = 20) -> dict:
    return {"mean": mean, "se": se, "n": n}


def _sweep(tmp_path: Path) -> dict:
    pts = [{"value": v, "metrics": {"mc1": _m(0.2 + 0.01 * v), "mc2": _m(0.4 + 0.01 * v - 0.002 * v * v)},
            "folds": [{"fold": k, "metrics": {"mc2": _m(0.4 + 0.01 * v - 0.002 * v * v)}} for k in (0, 1)]}
           for v in (1, 2, 3, 4)]
    return {"method": "florain", "model": "m", "param": "layer", "param_label": "layer (index)", "metric": "mc2",
            "folds": 2, "points": pts, "baseline": {"metrics": {"mc1": _m(0.2), "mc2": _m(0.4)}},
            "chosen": {"per_fold": {"0": 2, "1": 3}, "by_mean": 2},
            "final": {"metrics": {"mc1": _m(0.25), "mc2": _m(0.41)}}, "_dir": str(tmp_path)}


def test_plot_sweep_writes_png_and_svg_with_the_series(tmp_path):
    from bench.plots import plot_sweep

    paths = plot_sweep(_sweep(tmp_path))
    assert [p.name for p in paths] == ["sweep-layer.png", "sweep-layer.svg"] and all(p.stat().st_size for p in paths)
    svg = paths[1].read_text()
    for gid in ("series-mc1", "series-mc2", "baseline-mc2", "chosen-mc2"):
        assert f'id="{gid}' in svg
    assert "layer (index)" in svg and "validation scores vs layer" in svg and "MC2 (validation)" in svg
    assert "(fold 0)" in svg and "(fold 1)" in svg  # the folds chose different values: both marked
    with pytest.raises(ValueError, match="not in the sweep"):
        plot_sweep(_sweep(tmp_path), metrics=["kl"])


def test_plot_sweep_draws_the_truthfulqa_fluency_limit(tmp_path):
    from bench.plots import plot_sweep
    from bench.sweep import choose, fluency_limits

    def metrics(v):
        return {"true_info_product": _m(0.3 + 0.05 * v), "answer_nll": _m(0.7 + 0.3 * v), "empty_share": _m(0.0)}

    pts = [{"value": v, "metrics": metrics(v), "folds": [{"fold": 0, "metrics": metrics(v)}]} for v in (1, 2, 4)]
    base = {"metrics": metrics(0), "folds": [{"fold": 0, "metrics": metrics(0)}]}
    sweep = {"method": "florain", "model": "m", "param": "lam_scale", "metric": "true_info_product", "folds": 1,
             "task": "truthfulqa-gen", "max_fluency_ratio": 1.5, "points": pts, "baseline": base,
             "chosen": choose(pts, "true_info_product", fluency_limits(base, 1.5)), "_dir": str(tmp_path)}
    assert sweep["chosen"]["per_fold"] == {"0": 1}  # 0.7 + ln 1.5 admits only 1.0 of 1.0, 1.3, 1.9
    svg = plot_sweep(sweep)[1].read_text()
    for gid in ("series-answer_nll", "series-empty_share", "limit-answer_nll", "chosen-true_info_product"):
        assert f'id="{gid}' in svg
    assert "fluency limit (1.5× unintervened perplexity)" in svg and "answer perplexity ≤ 1.5×" in svg


def test_plot_tradeoff_and_toxicity_fluency(tmp_path):
    from bench.plots import plot_results, plot_tradeoff

    runs = [{"config": {"model": mo, "method": me}, "judge": {"backend": "embedded"},
             "scorer": {"fluency_model": "gemma3-270m"},
             "metrics": {"true": _m(0.3 + 0.1 * i), "info": _m(0.9 - 0.1 * i), "fluency_ppl": _m(10.0 + i, 1.0),
                         "expected_max_toxicity": _m(0.4 - 0.05 * i)}}
            for i, (mo, me) in enumerate([("a", "none"), ("a", "florain"), ("b", "iti")])]
    paths = plot_results(runs, tmp_path)
    assert sorted(p.name for p in paths) == ["toxicity_fluency.png", "toxicity_fluency.svg", "tradeoff.png",
                                             "tradeoff.svg"]
    svg = (tmp_path / "tradeoff.svg").read_text()
    for gid in ("series-a-none", "series-a-florain", "series-b-iti", "reference-a"):
        assert f'id="{gid}' in svg
    assert 'id="reference-b' not in svg  # model b has no unintervened run: no cross
    assert "a (20 questions)" in svg and "b (20 questions)" in svg  # one panel per model
    assert "Info (% of answers judged informative)" in svg and "True (% of answers judged true)" in svg
    tox = (tmp_path / "toxicity_fluency.svg").read_text()
    assert 'id="series-b-iti' in tox and "under gemma3-270m, lower" in tox and "log scale" not in tox
    runs[1]["metrics"]["fluency_ppl"] = _m(400.0, 5.0)  # 10 vs 400 on model a: a log axis
    assert "PPL, log scale" in plot_results(runs, tmp_path)[-1].read_text()
    assert plot_results([{"config": {"model": "a", "method": "none"}, "metrics": {"mc2": _m(0.4)}}], tmp_path) == []
    with pytest.raises(ValueError, match="True and Info"):
        plot_tradeoff([{"config": {"model": "a", "method": "none"}, "metrics": {"mc2": _m(0.4)}}], tmp_path)


def test_point_labels_of_crowded_methods_do_not_overlap():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from bench.plots import _scatter, _unclutter_labels

    methods = ["none", "few-shot", "caa", "mean-shift", "lofit", "florain"]  # all within a point of each other
    runs = [{"config": {"model": "m", "method": me}, "metrics": {"true": _m(0.35 + 0.003 * i), "info": _m(0.85)}}
            for i, me in enumerate(methods)]
    fig, ax = plt.subplots(figsize=(6, 4))
    _scatter(runs, "info", "true", 100.0, ax)
    ax.set_xlim(0, 100)
    ax.set_ylim(30, 100)
    renderer = fig.canvas.get_renderer()

    def boxes():  # the text alone, without its leader line
        return {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}

    before = boxes()
    assert any(before[a].overlaps(before[b]) for a in methods for b in methods if a < b)  # the problem
    _unclutter_labels(ax)
    fig.canvas.draw()  # as saving does: places the redrawn labels
    after = boxes()
    assert sorted(after) == sorted(methods)
    assert not any(after[a].overlaps(after[b]) for a in methods for b in methods if a < b)
    plt.close(fig)


# --------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize(("spec", "kind", "expected"), [
    ("4-24", int, list(range(4, 25))),
    ("4-24:2", int, list(range(4, 25, 2))),
    ("0.1,0.2,0.5", float, [0.1, 0.2, 0.5]),
    ("0.5-2:0.5", float, [0.5, 1.0, 1.5, 2.0]),
    ("1e-4-3e-4:1e-4, 1e-3", float, [1e-4, 2e-4, 3e-4, 1e-3]),
    ("8, 2-4, 8", int, [8, 2, 3, 4]),
    ("-1-1", float, [-1.0, 0.0, 1.0]),
])
def test_grid_parsing(spec, kind, expected):
    from bench.sweep import parse_values

    assert parse_values(spec, kind) == pytest.approx(expected)


@pytest.mark.parametrize(("spec", "kind", "message"), [
    ("24-4", int, "A ≤ B"), ("x", float, "cannot read"), ("0.5-2", float, "give a step"),
    ("1,0.5", int, "whole number"), ("1,,2", float, "empty item"), ("1-3:0", float, "positive step"),
])
def test_grid_errors(spec, kind, message):
    from bench.sweep import parse_values

    with pytest.raises(ValueError, match=message):
        parse_values(spec, kind)


def test_sweep_refuses_a_layer_the_method_would_ignore(tmp_path):
    r = runner.invoke(app, ["sweep", "--method", "iti", "--param", "alpha", "--values", "5,10", "--layer", "18",
                            "--output", str(tmp_path / "s")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "--layer does not apply to --method iti" in text and "--set layer=N" in text
    assert not (tmp_path / "s").exists()


def test_sweep_parameters_map_to_options_and_errors_list_the_valid_ones():
    from bench.runner import RunConfig
    from bench.sweep import parse_assignments, resolve_param, run_sweep, with_param

    assert resolve_param("iti", "alpha").target == "alpha" and resolve_param("iti", "k").name == "k"
    with pytest.raises(ValueError, match="no parameter 'iti_k'; valid: alpha, k"):  # old names: recorded runs only
        resolve_param("iti", "iti_k")
    iti_layer = resolve_param("iti", "layer")  # ITI's own option (heads chosen within it), not the run's layer
    assert iti_layer.option and not resolve_param("florain", "layer").option
    swept = with_param(RunConfig(method="iti"), iti_layer, 5)
    assert swept.layer is None and swept.options == {"layer": 5}
    assert parse_assignments("caa", ["layer=18"]) == (None, {"layer": 18})
    assert resolve_param("florain", "lam-scale").target == "lam_scale"
    assert resolve_param("caa", "multiplier").target == "multiplier"
    assert resolve_param("mean-shift", "scale").target == "scale"
    with pytest.raises(ValueError, match="valid: alpha, k, layer, rank, sigma_bank"):
        resolve_param("iti", "lam")
    with pytest.raises(ValueError, match="valid: layer, rank, alpha, extrapolation, lam, lam_scale"):
        resolve_param("florain", "gamma")
    with pytest.raises(ValueError, match="valid: layer, rank, alpha, lam, lam_scale, beta"):
        resolve_param("florain", "drop_identity", sweep=True)
    with pytest.raises(ValueError, match="known methods"):
        resolve_param("magic", "layer")
    assert parse_assignments("iti", ["rank=auroc", "alpha=5"]) == (None, {"rank": "auroc", "alpha": 5.0})
    with pytest.raises(ValueError, match="option rank: cannot read 'f1'; valid: accuracy | auroc"):
        parse_assignments("iti", ["rank=f1"])
    with pytest.raises(ValueError, match="not a number to sweep"):
        run_sweep(RunConfig(method="iti"), "rank", "1,2", Path("unused"))
    base = RunConfig(method="florain", options={"epochs": 3})
    cfg = with_param(base, resolve_param("florain", "layer"), 7, eval_split="val")
    assert cfg.layer == 7 and cfg.eval_split == "val" and base.layer is None and base.eval_split == "test"
    cfg = with_param(base, resolve_param("florain", "rank"), 4)
    assert cfg.options == {"epochs": 3, "rank": 4} and base.options == {"epochs": 3}
    assert parse_assignments("florain", ["epochs=300", "layer=5", "extrapolation=unit", "lam_scale=2"]) == (
        5, {"epochs": 300, "extrapolation": "unit", "lam_scale": 2.0})
    with pytest.raises(ValueError, match="belongs to the released form"):  # checked when set, not after a fit
        parse_assignments("florain", ["lam_scale=2"])


def test_choice_is_per_fold_and_direction_aware():
    from bench.sweep import choose

    def pt(v, a, b):
        return {"value": v, "metrics": {"x": _m((a + b) / 2), "kl": _m((a + b) / 2)},
                "folds": [{"fold": 0, "metrics": {"x": _m(a), "kl": _m(a)}}, {"fold": 1, "metrics": {"x": _m(b),
                                                                                                   "kl": _m(b)}}]}
    points = [pt(1, 0.5, 0.1), pt(2, 0.4, 0.3), pt(3, 0.4, 0.3)]
    assert choose(points, "x") == {"per_fold": {"0": 1, "1": 2}, "by_mean": 2, "direction": "higher"}
    assert choose(points, "kl") == {"per_fold": {"0": 2, "1": 1}, "by_mean": 1, "direction": "lower"}


def test_sweep_cli_end_to_end_on_a_tiny_model(tiny_dir, tqa_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "florain", "--param", "lam", "--values", "2,30", "--model", str(tiny_dir),
            "--data-dir", str(tqa_dir), "--limit", "12", "--layer", "1", "--set", "epochs=2", "--set", "rank=2",
            "--no-compile", "--output", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [2.0, 30.0] and sweep["param"] == "lam"
    point = json.loads((out / "lam=30" / "results.json").read_text())
    assert point["config"]["eval_split"] == "val" and point["config"]["options"]["lam"] == 30.0
    assert point["metrics"]["mc2"]["n"] == sum(f["n_val"] for f in point["folds"])  # scored on validation
    finals = [json.loads((out / r["run"] / "results.json").read_text()) for r in sweep["final"]["runs"]]
    assert all(f["config"]["eval_split"] == "test" for f in finals)  # each fold's chosen value on its test fold
    assert sum(f["metrics"]["mc2"]["n"] for f in finals) == 12
    assert set(sweep["chosen"]["per_fold"]) == {"0", "1"} and "baseline" in sweep
    assert (out / "sweep-lam.png").is_file() and (out / "sweep-lam.svg").is_file() and (out / "sweep.md").is_file()
    again = runner.invoke(app, args)  # resumable: finished points are reused
    assert again.exit_code == 0 and again.output.count("finished, reusing") >= 4
    r = runner.invoke(app, ["plot", str(out), "--output", str(tmp_path / "figs")])
    assert r.exit_code == 0 and (tmp_path / "figs" / "sweep-lam.svg").is_file()
    bad = runner.invoke(app, [*args[:4], "gamma", *args[5:]])
    assert bad.exit_code == 2 and "valid: layer, rank" in " ".join(bad.output.split())


def test_sweep_rejects_a_metric_the_task_does_not_produce_before_running(tiny_dir, tqa_dir, tmp_path):
    r = runner.invoke(app, ["sweep", "--method", "florain", "--param", "lam", "--values", "1,2", "--metric", "kl",
                            "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--output", str(tmp_path / "s")])
    assert r.exit_code == 2 and "available: mc1, mc2, mc3" in " ".join(r.output.split())
    assert not (tmp_path / "s" / "lam=1").exists()


def test_eval_split_and_eval_folds_are_validated(tiny_dir, tqa_dir, tmp_path):
    from bench.runner import RunConfig, run

    with pytest.raises(ValueError, match="valid: test, val"):
        run(RunConfig(method="none", model=str(tiny_dir), limit=12, eval_split="train"), tmp_path / "a", str(tqa_dir))
    with pytest.raises(ValueError, match="out of range"):
        run(RunConfig(method="none", model=str(tiny_dir), limit=12, eval_folds=[2]), tmp_path / "b", str(tqa_dir))


# --------------------------------------------------------------------------- reproduce-table1


def test_reproduce_table1_fails_fast_listing_the_missing_models(tmp_path, monkeypatch, capsys):
    from bench.models import ModelNotAvailableError
    from bench.reproduce import main, reproduce_table1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing is available
    t = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        reproduce_table1(["llama-7b", "llama2-chat-13b", "llama3-8b"], tmp_path / "t1")
    assert time.perf_counter() - t < 5
    msg = str(err.value)
    for name in ("llama-7b (huggyllama/llama-7b)", "llama2-chat-13b", "llama3-8b", "hf auth login",
                 'MODELS="smollm2-135m gemma3-270m"'):
        assert name in msg
    assert not (tmp_path / "t1").exists()  # nothing ran
    assert main(["table1", "--output", str(tmp_path / "t1")]) == 2
    assert "are not available, so nothing was run" in capsys.readouterr().err


def test_make_reproduce_table1_passes_models_and_limit():
    out = subprocess.run(["make", "-n", "reproduce-table1", "MODELS=smollm2-135m gemma3-270m", "LIMIT=40"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True).stdout
    line = next(x for x in out.splitlines() if "bench.reproduce table1" in x)
    assert '--models "smollm2-135m gemma3-270m"' in line and "--limit 40" in line and "table1-limit40" in line
    default = subprocess.run(["make", "-n", "reproduce-table1"], capture_output=True, text=True,
                             cwd=Path(__file__).parents[1], check=True).stdout
    assert '--models "llama-7b llama2-chat-13b llama3-8b"' in default and "--limit" not in default


def test_reproduce_table1_on_a_tiny_model(tiny_dir, tqa_dir, tmp_path, judge_cache):
    from bench.reproduce import reproduce_table1

    opts = {"max_new_tokens": 4, "kl_windows": 2, "kl_length": 16, "kl_source": str(tqa_dir / "texts.jsonl"),
            "compile": False, "options": {"florain": {"epochs": 2, "rank": 2}}}
    (tqa_dir / "texts.jsonl").write_text("".join(json.dumps({"text": f"Sentence {i} is here."}) + "\n"
                                                 for i in range(40)))
    done = reproduce_table1([str(tiny_dir)], tmp_path / "t1", ("none", "florain"), limit=12, data_dir=str(tqa_dir),
                            run_options=opts, echo=lambda m: None)
    md = Path(done["tables"]["md"]).read_text()
    assert "True*Info (product of rates)" in md and "| florain |" in md and "| none |" in md
    assert {Path(p).name for p in done["plots"]} == {"tradeoff.png", "tradeoff.svg"}
    layers = [json.loads((tmp_path / "t1" / "runs" / f"{tiny_dir.name}-florain" / f"fold_{k}.layer.json").read_text())
              for k in (0, 1)]  # no registry layer: each fold chose its own by the probe rule
    assert all(x["layer"] in (0, 1, 2) and len(x["mean_accuracy"]) == 3 for x in layers)
    again = []
    reproduce_table1([str(tiny_dir)], tmp_path / "t1", ("none", "florain"), limit=12, data_dir=str(tqa_dir),
                     run_options=opts, echo=again.append)
    assert sum("finished, reusing" in m for m in again) == 2  # resumable: finished runs are reused


# --------------------------------------------------------------------------- regress


def _scores(**values: float) -> dict:
    return {m: _m(v, 0.01, 30) for m, v in values.items()}


def _ref(**scores) -> dict:
    from bench.regress import TOLERANCES

    return {"config": {"model": "x"}, "scores": scores, "errors": {}, "tolerances": TOLERANCES,
            "effects": {}}


def test_regress_comparison_is_direction_aware():
    """Worse and better both fail (two-sided; more cases in test_regress_compare.py)."""
    from bench.regress import compare, render

    ref = _ref(none=_scores(mc2=0.45, true=0.5, ce=2.5, kl=0.0), florain=_scores(mc2=0.55, true=0.6, ce=2.6, kl=0.3))
    same = {"config": {"model": "x"}, "scores": json.loads(json.dumps(ref["scores"])), "errors": {}}
    passed, rows, problems = compare(ref, same)
    assert passed and not problems and {r.status for r in rows} == {"ok"}
    cur = json.loads(json.dumps(same))
    cur["scores"]["florain"]["mc2"]["mean"] = 0.52  # −0.03 > tolerance 0.02: worse
    cur["scores"]["florain"]["kl"]["mean"] = 0.1  # KL −0.2: lower is better, better (fails: two-sided)
    cur["scores"]["florain"]["ce"]["mean"] = 2.64  # CE +0.04 ≤ 0.05: ok
    cur["scores"]["none"]["true"]["mean"] = 0.6  # +0.1: better (fails)
    passed, rows, _ = compare(ref, cur)
    status = {(r.method, r.metric): r.status for r in rows}
    assert not passed and status[("florain", "mc2")] == "WORSE" and status[("florain", "kl")] == "BETTER"
    assert status[("florain", "ce")] == "ok" and status[("none", "true")] == "BETTER"
    cur["scores"]["florain"]["mc2"]["mean"] = 0.535  # −0.015: within tolerance
    cur["scores"]["florain"]["ce"]["mean"] = 2.7  # CE +0.1: worse
    cur["scores"]["florain"]["kl"]["mean"] = 0.3  # back to the reference
    cur["scores"]["none"]["true"]["mean"] = 0.5
    passed, rows, _ = compare(ref, cur)
    assert not passed and {(r.metric, r.status) for r in rows if r.status != "ok"} == {("ce", "WORSE")}
    table = render(rows)
    assert "| florain | CE | lower | 2.6000 | 2.7000 | +0.1000 | 0.05 | WORSE |" in table
    failed = {**same, "errors": {"florain": "RuntimeError: boom"}, "scores": {"none": same["scores"]["none"]}}
    passed, rows, problems = compare(ref, failed)
    assert not passed and {r.status for r in rows if r.method == "florain"} == {"FAILED"}
    assert "florain failed to run: RuntimeError: boom" in problems
    missing = json.loads(json.dumps(same))
    del missing["scores"]["none"]["mc2"]
    assert [r.status for r in compare(ref, missing)[1] if r.metric == "mc2" and r.method == "none"] == ["MISSING"]
    other = {**same, "config": {"model": "y"}}
    passed, _, problems = compare(ref, other)
    assert not passed and "configuration differs" in problems[0]


def test_regress_on_a_tiny_model_fails_when_the_florain_hook_is_disabled(tiny_dir, tqa_dir, tmp_path, monkeypatch):
    from contextlib import nullcontext

    from bench.interventions import Intervention
    from bench.regress import RegressConfig, check

    cfg = RegressConfig(model=str(tiny_dir), limit=12, task="truthfulqa-mc", layer=1, metrics=["mc1", "mc2"],
                        methods={"none": {}, "florain": {"epochs": 3, "rank": 2, "lam": 20}})
    ref = tmp_path / "reference.json"
    quiet = {"echo": lambda m: None}
    assert check(cfg, ref, tmp_path / "out", str(tqa_dir), update=True, **quiet)[0]
    reference = json.loads(ref.read_text())
    assert reference["effects"]["florain"] > 1e-6 and "tolerance_notes" in reference
    passed, report = check(cfg, ref, tmp_path / "out", str(tqa_dir), **quiet)
    assert passed, report
    real = Intervention.applied

    def disabled(self, lm, positions="all"):
        return nullcontext() if self.method == "florain" else real(self, lm, positions)

    monkeypatch.setattr(Intervention, "applied", disabled)
    passed, report = check(cfg, ref, tmp_path / "out", str(tqa_dir), **quiet)
    assert not passed and "NO EFFECT" in report and "florain no longer changes any score" in report
    assert "FAILED:" in (tmp_path / "out" / "diff.md").read_text()
    assert json.loads(ref.read_text()) == reference  # never updated automatically


def test_regress_reference_is_committed_with_tolerances():
    from bench.regress import DEFAULT, REFERENCE_FILE, load_reference

    ref = load_reference(REFERENCE_FILE)
    assert ref["config"] == json.loads(json.dumps(DEFAULT.__dict__))
    assert set(ref["scores"]) == {"none", "iti", "florain"} and not ref["errors"]
    assert all(m in ref["tolerances"] for s in ref["scores"].values() for m in s)


def test_fluency_limited_choice_skips_values_that_wreck_fluency():
    from bench.sweep import choose, fluency_limits

    def pt(v, tox, ppl, dropped=0):
        metrics = {"expected_max_toxicity": _m(tox), "fluency_ppl": _m(ppl)}
        return {"value": v, "metrics": metrics,
                "folds": [{"fold": 0, "metrics": metrics, "counts": {"samples": 100, "ppl_dropped_high": dropped}}]}

    base = pt(None, 0.6, 100.0, dropped=1)
    limits = fluency_limits(base, 2.0)
    assert limits[0] == {"max_ppl": 200.0, "max_dropped_share": pytest.approx(0.02)}
    points = [pt(1, 0.5, 120.0), pt(4, 0.3, 190.0, dropped=2), pt(8, 0.2, 150.0, dropped=5), pt(16, 0.1, 900.0)]
    assert choose(points, "expected_max_toxicity")["per_fold"] == {"0": 16}  # unconstrained: the strongest
    chosen = choose(points, "expected_max_toxicity", limits)
    assert chosen["per_fold"] == {"0": 4} and chosen["by_mean"] == 4  # 8 drops too many, 16 is too perplexing
    with pytest.raises(ValueError, match="no grid value keeps fluency"):
        choose(points[3:], "expected_max_toxicity", limits)
    with pytest.raises(ValueError, match="≥ 1"):
        fluency_limits(base, 0.5)
    no_counts = {**points[0], "folds": [{"fold": 0, "metrics": points[0]["metrics"]}]}
    with pytest.raises(ValueError, match="no sample counts"):
        choose([no_counts], "expected_max_toxicity", limits)


def test_truthfulqa_fluency_limit_bounds_answer_perplexity_and_empty_answers():
    from bench.sweep import choose, fluency_limits

    def pt(v, ti, nll, empty=0.0):
        metrics = {"true_info_product": _m(ti), "answer_nll": _m(nll), "empty_share": _m(empty)}
        return {"value": v, "metrics": metrics, "folds": [{"fold": 0, "metrics": metrics}]}

    limits = fluency_limits(pt(None, 0.3, 1.0, empty=0.02), 1.5)
    assert limits[0] == {"max_answer_nll": pytest.approx(1.0 + math.log(1.5)), "max_empty_share": pytest.approx(0.07)}
    # 8 wins unconstrained by breaking the answers (NLL + 2 nats); 4 empties a tenth of them; 2 is the honest choice
    points = [pt(1, 0.31, 1.1), pt(2, 0.35, 1.3, empty=0.04), pt(4, 0.40, 1.2, empty=0.10), pt(8, 0.45, 3.0)]
    assert choose(points, "true_info_product")["per_fold"] == {"0": 8}
    assert choose(points, "true_info_product", limits)["per_fold"] == {"0": 2}
    with pytest.raises(ValueError, match=r"answer_nll ≤ 1\.405.*'8': \{'answer_nll': 3\.0"):
        choose(points[3:], "true_info_product", limits)
    with pytest.raises(ValueError, match="records no fluency"):
        fluency_limits({"folds": [{"fold": 0, "metrics": {"mc2": _m(0.4)}}]}, 1.5)


def test_a_run_of_an_earlier_recipe_or_a_fixed_layer_is_not_reused():
    """A run fitted by an earlier version of a method's recipe (no ``method_version``: version 1), or at a fixed
    layer where the layer is now chosen per fold, is another run, whatever its options."""
    from dataclasses import asdict

    from bench.runner import RunConfig
    from bench.sweep import _same_run

    cfg = RunConfig(method="florain", model="m", task="truthfulqa", layer=3)
    assert not _same_run({"config": asdict(cfg)}, cfg)
    assert _same_run({"config": asdict(cfg), "method_version": 2}, cfg)
    none = RunConfig(method="none", model="m", task="truthfulqa")
    assert _same_run({"config": asdict(none)}, none)  # version 1: unchanged
    per_fold = RunConfig(method="mean-shift", model="smollm2-135m", task="truthfulqa")  # no registry layer
    fixed = {"config": {**asdict(per_fold), "layer": 16}, "method_version": 2}
    assert not _same_run(fixed, per_fold)
    assert _same_run({"config": asdict(per_fold), "method_version": 2}, per_fold)
    paper = RunConfig(method="florain", model="llama-7b", task="truthfulqa")
    assert _same_run({"config": {**asdict(paper), "layer": 11}, "method_version": 2}, paper)  # the paper's layer


def test_a_finished_run_is_reused_when_its_effective_options_match():
    """`bench run` records drop_identity=False; a sweep or table-1 run that leaves it unset means the same."""
    from dataclasses import asdict

    from bench.runner import RunConfig
    from bench.sweep import _same_run

    # recorded by an earlier version: the method's seed and torch.compile were options then
    recorded = RunConfig(method="florain", model="m", task="truthfulqa", layer=3,
                         options={"seed": 42, "compile": True, "drop_identity": False})
    res = {"config": asdict(recorded), "method_version": 2}
    assert _same_run(res, RunConfig(method="florain", model="m", task="truthfulqa", layer=3, compile=False))
    assert _same_run(res, RunConfig(method="florain", model="m", task="truthfulqa", layer=3, options={"rank": 32}))
    assert not _same_run(res, RunConfig(method="florain", model="m", task="truthfulqa", layer=3, options={"rank": 8}))
    assert not _same_run(res, RunConfig(method="florain", model="m", task="truthfulqa", layer=3,
                                        options={"drop_identity": True}))
    assert not _same_run(res, RunConfig(method="florain", model="m", task="truthfulqa", layer=4))
    iti = {"config": asdict(RunConfig(method="iti", model="m", task="truthfulqa", options={"seed": 42})),
           "method_version": 2}
    assert _same_run(iti, RunConfig(method="iti", model="m", task="truthfulqa",
                                    options={"rank": "accuracy", "alpha": 15.0, "k": None}))
    assert not _same_run(iti, RunConfig(method="iti", model="m", task="truthfulqa", options={"rank": "auroc"}))
    assert not _same_run(iti, RunConfig(method="iti", model="m", task="truthfulqa", options={"k": 13}))
    old = {"config": asdict(RunConfig(method="iti", model="m", task="truthfulqa", options={"iti_alpha": 5.0})),
           "method_version": 2}  # option names recorded before options were typed
    assert _same_run(old, RunConfig(method="iti", model="m", task="truthfulqa", options={"alpha": 5}))
    assert not _same_run(old, RunConfig(method="iti", model="m", task="truthfulqa"))


def test_reproduce_runs_florain_before_the_mean_shift_matched_to_it():
    from bench.reproduce import TABLE1_METHODS, _florain_before_mean_shift

    assert _florain_before_mean_shift(("none", "mean-shift", "iti", "florain")) == ["none", "iti", "florain",
                                                                                   "mean-shift"]
    assert _florain_before_mean_shift(TABLE1_METHODS) == list(TABLE1_METHODS)
    assert _florain_before_mean_shift(("mean-shift",)) == ["mean-shift"]


def test_a_committed_run_without_fold_files_counts_as_finished(tmp_path):
    """Committed runs keep results.json but not fold_K.json: the folds' recorded metrics count."""
    from bench.runner import missing_parts

    mc = {m: {"mean": 0.5} for m in ("mc1", "mc2", "mc3")}
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 1, "config": {}, "metrics": mc,
                                                       "folds": [{"fold": 0, "metrics": mc}]}))
    assert missing_parts(tmp_path, "truthfulqa-mc", [0]) == []
    assert missing_parts(tmp_path, "truthfulqa-mc", [0, 1]) == ["fold_1.mc"]
    assert missing_parts(tmp_path, "truthfulqa", [0])[0] == "fold_0.gen"  # a part the run lacks
