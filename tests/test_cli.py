"""End-to-end runs of the ``bench`` CLI on a tiny model saved to a local directory and a small CSV."""

import json

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.runs import RunFolder

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, ["run", *args])
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def test_florain_and_none_runs_write_results(tiny_dir, tqa_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    r_none = _run("--method", "none", *common, "--output", str(tmp_path / "none"))
    assert r_none.exit_code == 0, r_none.output
    r_fl = _run("--method", "florain", *common, "--layer", "1", "-O", "epochs=3", "-O", "rank=2", "-O", "lam=5", "--no-compile",
                "--output", str(tmp_path / "fl"))
    assert r_fl.exit_code == 0, r_fl.output
    res_none = json.loads((tmp_path / "none" / "results.json").read_text())
    res_fl = json.loads((tmp_path / "fl" / "results.json").read_text())
    for res in (res_none, res_fl):
        assert set(res["metrics"]) == {"mc1", "mc2", "mc3"} and len(res["folds"]) == 2
        assert res["data"]["n_questions"] == 12 and res["environment"]["packages"]["torch"]
        assert res["metrics"]["mc2"]["n"] == 12
    assert res_fl["config"]["options"]["lam"] == 5.0
    assert res_fl["metrics"]["mc2"]["mean"] != res_none["metrics"]["mc2"]["mean"]
    assert (tmp_path / "fl" / "intervention_fold0" / "intervention.safetensors").exists()
    assert "| MC1 |" in r_fl.stdout or "MC1" in r_fl.output
    # a finished run is never overwritten
    again = _run("--method", "none", *common, "--output", str(tmp_path / "none"))
    assert again.exit_code == 2 and "already holds a finished run" in again.text


def test_resume_reuses_finished_folds(tiny_dir, tqa_dir, tmp_path):
    common = ["--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    out = tmp_path / "run"
    assert _run(*common, "--output", str(out)).exit_code == 0
    first = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # as if the run had been killed after its folds
    (out / "fold_1.json").unlink()
    r = _run(*common, "--output", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "already done" in r.text
    second = json.loads((out / "results.json").read_text())
    assert second["metrics"] == first["metrics"]


def test_a_resumed_run_records_which_commit_computed_each_part(tiny_dir, tqa_dir, tmp_path, monkeypatch):
    """``environment.git`` is the last process's; ``git_by_file`` names the code behind every fit and part."""
    from bench import runner, runs

    def at(commit):
        state = {"commit": commit, "dirty": False}
        monkeypatch.setattr(runs, "git_commit", lambda: dict(state))
        monkeypatch.setattr(runner, "git_commit", lambda: dict(state))

    common = ["--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    out = tmp_path / "run"
    at("a" * 40)
    assert _run(*common, "--output", str(out)).exit_code == 0
    for name in ("results.json", "fold_1.json", "fold_1.mc.json"):  # killed during fold 1's MC part
        (out / name).unlink()
    at("b" * 40)
    r = _run(*common, "--output", str(out), "--resume")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["git"]["commit"] == "b" * 40
    by_file = {name: g["commit"] for name, g in res["environment"]["git_by_file"].items()}
    assert by_file == {"fold_0.fit.json": "a" * 40, "fold_0.mc.json": "a" * 40,
                       "fold_1.fit.json": "a" * 40, "fold_1.mc.json": "b" * 40}
    assert json.loads((out / "fold_1.json").read_text())["git"]["fold_1.mc.json"]["commit"] == "b" * 40


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "known aliases"),
        (["--method", "magic"], "known methods"),
        (["--layer", "99"], "out of range"),
        (["--task", "nope"], "unknown task"),
    ],
)
def test_bad_input_gives_clear_errors(tiny_dir, tqa_dir, args, message):
    base = {"--model": str(tiny_dir), "--method": "florain", "--layer": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    r = _run(*flat, "--data-dir", str(tqa_dir), "--limit", "12")
    assert r.exit_code == 2
    assert message in r.text


def test_limit_larger_than_data_uses_all(tiny_dir, tqa_dir, tmp_path):
    r = _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "500",
             "--output", str(tmp_path / "r"))
    assert r.exit_code == 0, r.output
    assert "larger than the data" in r.text
    assert json.loads((tmp_path / "r" / "results.json").read_text())["data"]["n_questions"] == 12


def test_missing_data_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "TruthfulQA not found" in r.text


def test_help_lists_every_flag():
    r = runner.invoke(app, ["run", "--help"])
    for flag in ("--method", "--model", "--layer", "--option", "-O", "--folds", "--seed", "--limit", "--data-dir",
                 "--output", "--site", "--compile"):
        assert flag in r.output


def test_layers_command_ranks_layers_by_probe_accuracy(tiny_dir, tqa_dir, tmp_path):
    out = tmp_path / "layers.json"
    r = runner.invoke(app, ["layers", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(res["layers"]) == 3 and 0 <= res["best_layer"] < 3
    accs = [row["mean_acc"] for row in res["layers"]]
    assert res["best_layer"] == accs.index(max(accs))
    # the layer was chosen on fold 1's test questions: the command says so and how to avoid the leak
    said = " ".join(r.output.split())  # rich wraps at the terminal's width
    assert "fold 1's test questions" in said and "leave --layer out" in said


@pytest.mark.parametrize("method", ["iti", "mean-shift", "caa", "mean-diff-resid", "lofit", "few-shot"])
def test_every_baseline_runs_and_differs_from_none(method, tiny_dir, tqa_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    own = {"iti": ["-O", "k=2", "-O", "alpha=50"], "mean-shift": ["--layer", "1", "-O", "scale=8"],
           "caa": ["-O", "layer=1", "-O", "multiplier=8"],
           "mean-diff-resid": ["--layer", "1", "-O", "multiplier=8"], "lofit": ["-O", "lr=0.1"], "few-shot": ["-O", "shots=3"]}
    r0 = _run("--method", "none", *common, "--output", str(tmp_path / "none"))
    r1 = _run("--method", method, *common, *own[method], "--output", str(tmp_path / method))
    assert r0.exit_code == 0 and r1.exit_code == 0, r1.output
    a = json.loads((tmp_path / "none" / "results.json").read_text())["metrics"]["mc2"]["mean"]
    res = json.loads((tmp_path / method / "results.json").read_text())
    assert res["metrics"]["mc2"]["mean"] != a
    from bench.interventions import get_method
    from bench.options import specs

    given = dict(o.split("=") for o in own[method] if "=" in o)
    assert res["config"]["options"] == get_method(method).given_options(given)  # as given, typed, by name
    assert set(res["method_options"]) == {s.name for s in specs(get_method(method).options)}  # every option


def test_lm_eval_tasks_through_the_harness_match_our_lm_eval_mode(tiny_dir, tqa_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12"]
    r1 = _run("--method", "none", *common, "--eval-batch-size", "4", "--task", "lm-eval:truthfulqa_mc1,truthfulqa_mc2",
              "--output", str(tmp_path / "a"))
    assert r1.exit_code == 0, r1.output
    r2 = _run("--method", "none", *common, "--score-batch-size", "4", "--prompt-mode", "lm-eval",
              "--output", str(tmp_path / "b"))
    assert r2.exit_code == 0, r2.output
    theirs = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]
    ours = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]
    assert abs(theirs["truthfulqa_mc1/acc"]["mean"] - ours["mc1"]["mean"]) <= 1e-4
    assert abs(theirs["truthfulqa_mc2/acc"]["mean"] - ours["mc2"]["mean"]) <= 1e-4
    r3 = _run("--method", "florain", *common, "--layer", "1", "-O", "epochs=2", "-O", "lam=20", "--no-compile",
              "--task", "lm-eval:truthfulqa_mc2", "--output", str(tmp_path / "c"))
    assert r3.exit_code == 0, r3.output
    steered = json.loads((tmp_path / "c" / "results.json").read_text())["metrics"]
    assert steered["truthfulqa_mc2/acc"]["mean"] != theirs["truthfulqa_mc2/acc"]["mean"]


def test_an_interrupted_run_leaves_no_results_json(tiny_dir, tqa_dir, tmp_path, monkeypatch):
    import bench.tasks.truthfulqa

    real = bench.tasks.truthfulqa.evaluate_mc
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.tasks.truthfulqa, "evaluate_mc", interrupted)
    out = tmp_path / "run"
    _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12", "--output", str(out))
    assert (out / "fold_0.json").exists()
    assert not (out / "results.json").exists() and not (out / "fold_1.json").exists()
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".results.json*"))


def test_truthfulqa_task_reports_generation_kl_ce_and_resumes_to_the_same_numbers(tiny_dir, tqa_dir, tmp_path,
                                                                                  judge_cache):
    common = ["--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12", "--task", "truthfulqa",
              "--max-new-tokens", "6", "--gen-batch-size", "2", "--kl-windows", "3", "--kl-length", "16",
              "--kl-source", str(tqa_dir / "texts.jsonl")]
    (tqa_dir / "texts.jsonl").write_text("".join(json.dumps({"text": f"Sentence number {i} is here."}) + "\n"
                                                 for i in range(50)))
    out = tmp_path / "none"
    r = _run("--method", "none", *common, "--output", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert {"mc1", "mc2", "true", "info", "true_and_info", "true_info_product", "ce", "kl", "answer_nll",
            "empty_share"} <= set(res["metrics"])
    assert res["metrics"]["kl"]["mean"] == 0.0 and res["judge"]["backend"] == "embedded"
    assert res["metrics"]["answer_nll"]["mean"] > 0 and 0 <= res["metrics"]["empty_share"]["mean"] <= 1
    assert res["data"]["kl_ce_texts"]["source"].endswith("texts.jsonl")
    rows = RunFolder(out).read_per_question()
    assert len(rows) == 12 and all({"answer", "p_true", "mc2", "answer_nll"} <= set(x) for x in rows)
    # kill fold 1 half-way through its generations (a torn last line included) and resume
    for f in ("results.json", "fold_1.json", "fold_1.gen.json", "fold_1.klce.json", "judgements_fold1.jsonl"):
        (out / f).unlink()
    lines = (out / "generations_fold1.jsonl").read_text().splitlines()
    (out / "generations_fold1.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    r = _run("--method", "none", *common, "--output", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "reusing 2 saved generations" in r.text
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["metrics"] == res["metrics"]
    assert res["timings"]["reused"] == [] and resumed["timings"]["reused"] == ["fold_0.json", "fold_1.fit.json",
                                                                                "fold_1.mc.json"]
    assert resumed["timings"]["fit_s"] == res["timings"]["fit_s"]  # the earlier process's work still counts
    # the KL/CE texts are read before the model loads: a --kl-source that went missing stops even a resume whose
    # KL/CE parts are done, naming the file, before anything loads; put back, the resume reuses every part
    for f in ("results.json", "fold_1.json", "fold_1.fluency.json"):
        (out / f).unlink()
    (tqa_dir / "texts.jsonl").rename(tqa_dir / "moved.jsonl")
    r = _run("--method", "none", *common, "--output", str(out), "--resume")
    assert r.exit_code == 2 and "texts.jsonl does not exist" in r.text, r.output
    (tqa_dir / "moved.jsonl").rename(tqa_dir / "texts.jsonl")
    r = _run("--method", "none", *common, "--output", str(out), "--resume")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"] == res["metrics"] and again["data"]["kl_ce_texts"] == res["data"]["kl_ce_texts"]
    assert "fold_1.klce.json" in again["timings"]["reused"]
    steered = tmp_path / "iti"
    r = _run("--method", "iti", "-O", "alpha=50", *common, "--output", str(steered))
    assert r.exit_code == 0, r.output
    assert json.loads((steered / "results.json").read_text())["metrics"]["kl"]["mean"] > 0


def test_unknown_judge_or_preset_is_rejected_before_the_run(tiny_dir, tqa_dir):
    base = ["--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--task", "truthfulqa-gen"]
    r = _run(*base, "--judge", "oracle")
    assert r.exit_code == 2 and "valid: embedded, hf, openai" in r.text
    r = _run(*base, "--gen-preset", "chatty")
    assert r.exit_code == 2 and "valid: iti" in r.text


def test_eval_split_and_eval_fold_flags_select_the_questions(tiny_dir, tqa_dir, tmp_path):
    from bench.data.truthfulqa import make_folds

    out = tmp_path / "val"
    r = _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "12",
             "--eval-split", "val", "--eval-fold", "1", "--output", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert [f["fold"] for f in res["folds"]] == [1] and res["config"]["eval_split"] == "val"
    assert res["metrics"]["mc2"]["n"] == len(make_folds(12, 2, 0.2, 42)[1].val)
    bad = _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--eval-split", "train")
    assert bad.exit_code == 2 and "valid: test, val" in bad.text


@pytest.mark.parametrize("args, message", [
    (["--method", "iti", "--layer", "1"], "--layer does not apply to --method iti"),
    (["--method", "none", "--layer", "1"], "Methods that take --layer: florain, mean-shift, mean-diff-resid"),
    (["--method", "iti", "-O", "rank=4"], "--method iti option rank: cannot read '4'; valid: accuracy | auroc"),
    (["--method", "iti", "-O", "lam=4"], "--method iti has no option 'lam'; valid: alpha, k, layer, rank, sigma_bank"),
    (["--method", "florain", "--layer", "1", "-O", "shots=2", "-O", "batch_size=8"],
     "--method florain has no option 'shots'"),
    (["--method", "mean-diff-resid", "--layer", "1", "-O", "drop_identity=true"],
     "--method mean-diff-resid has no option 'drop_identity'; valid: multiplier"),
    (["--method", "caa", "--layer", "1"], "to fix it use -O layer=N"),
    (["--method", "caa", "-O", "layer=top"], "--method caa option layer: cannot read 'top'; valid: int | auto"),
    (["--method", "iti", "-O", "rank=AUROC"], "valid: accuracy | auroc"),
    (["--method", "florain", "--layer", "1", "-O", "rank=0", "-O", "lam=nan"],
     "option rank must be ≥ 1, got 0; --method florain option lam must be a finite number, got nan"),  # all at once
    (["--method", "florain", "--layer", "1", "-O", "rank"], "-O 'rank': expected NAME=VALUE"),
    (["--method", "florain", "--layer", "1", "-O", "lam_scale=3"], "belongs to the released form"),
])
def test_flags_the_method_would_ignore_are_refused(args, message, tiny_dir, tqa_dir, tmp_path):
    out = tmp_path / "run"
    r = _run(*args, "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "4", "--output", str(out))
    assert r.exit_code == 2 and message in r.text, r.output
    assert not out.exists()


def test_a_run_finished_before_a_part_existed_gains_only_that_part(tiny_dir, tqa_dir, tmp_path, judge_cache):
    """A truthfulqa-gen run made before the ``fluency`` part: sweeps/reproduction (``run_point``) add the part from
    the saved generations without regenerating, and reach the numbers of a run that had it from the start."""
    from bench.runner import RunConfig
    from bench.sweep import run_point

    cfg = dict(method="none", model=str(tiny_dir), task="truthfulqa-gen", limit=12, max_new_tokens=6, gen_batch_size=4)
    out = tmp_path / "run"
    first = run_point(RunConfig(**cfg), out, str(tqa_dir), echo=lambda s: None)
    gens = (out / "generations_fold0.jsonl").read_text()
    for k in (0, 1):  # as the run looked before: no fluency part, no fluency metrics
        (out / f"fold_{k}.fluency.json").unlink()
        fold = json.loads((out / f"fold_{k}.json").read_text())
        fold["metrics"] = {m: v for m, v in fold["metrics"].items() if m not in ("answer_nll", "empty_share")}
        (out / f"fold_{k}.json").write_text(json.dumps(fold))
    old = json.loads((out / "results.json").read_text())
    old["metrics"] = {m: v for m, v in old["metrics"].items() if m not in ("answer_nll", "empty_share")}
    old["timings"].pop("earlier_total_s")
    # recorded before the toxicity fields existed (their defaults then are the run's settings)
    later = ("fluency_model", "samples", "top_p", "scorer", "scorer_options", "steer_data", "tox_prompts")
    # ... and by a version whose runs recorded the method's seed and torch.compile among its options
    old["config"] = {k: v for k, v in old["config"].items() if k not in later} | {
        "options": {"seed": 42, "compile": True}}
    (out / "results.json").write_text(json.dumps(old))
    marker = json.loads((out / "run_config.json").read_text())
    marker["config"] = {k: v for k, v in marker["config"].items() if k not in later} | {
        "options": {"seed": 42, "compile": True}}
    (out / "run_config.json").write_text(json.dumps(marker))
    said: list[str] = []
    again = run_point(RunConfig(**cfg), out, str(tqa_dir), echo=said.append)  # the same run, by the one rule
    assert any("finished without fold_0.fluency, fold_1.fluency" in s for s in said)
    # each computed part logs one line with its scores (progress bars do not draw in a log file); reused parts do not
    done = [s for s in said if " done in " in s]
    assert [s.split(":")[0] for s in done] == ["fold 0", "fold 1"] and all("fluency done" in s for s in done), said
    assert all("answer_nll" in s and "empty_share" in s for s in done), done
    assert again["metrics"] == first["metrics"] and (out / "generations_fold0.jsonl").read_text() == gens
    assert set(again["timings"]["reused"]) == {"fold_0.fit.json", "fold_0.gen.json", "fold_1.fit.json", "fold_1.gen.json"}
    assert again["timings"]["earlier_total_s"] == [old["timings"]["total_s"]]
    # now complete: reused as it is, also without its part files (runs written before part files existed)
    (out / "fold_0.gen.json").unlink()
    said.clear()
    run_point(RunConfig(**cfg), out, str(tqa_dir), echo=said.append)
    assert any("finished, reusing" in s for s in said)
    # a run directory started with other settings is never resumed into
    from bench.runner import run

    with pytest.raises(ValueError, match="started with a different configuration"):
        run(RunConfig(**{**cfg, "max_new_tokens": 7}), out, str(tqa_dir), resume=True, echo=lambda s: None)


def test_every_problem_is_reported_at_once_before_anything_loads(tiny_dir, tqa_dir, tmp_path):
    out = tmp_path / "run"
    r = _run("--method", "florain", "--layer", "1", "-O", "rank=0", "--folds", "1", "--val-ratio", "1.5",
             "--prompt-mode", "chat", "--top-p", "nan", "--model", str(tmp_path / "no-model"), "--data-dir",
             str(tmp_path / "no-data"), "--output", str(out))
    assert r.exit_code == 2, r.output
    for part in ("7 problems with this run", "--top-p applies to --task toxicity only", "option rank must be ≥ 1, got 0",
                 "--folds must be ≥ 2",
                 "--val-ratio must lie in [0, 1), got 1.5", "unknown --prompt-mode 'chat'; valid: iti, lm-eval",
                 "--top-p must lie in (0, 1], got nan", "no-model: no such local folder"):
        assert part in r.text, part
    assert not out.exists()  # nothing written: the corrected command starts clean
    if not __import__("torch").cuda.is_available():
        r = _run("--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--device", "cuda")
        assert r.exit_code == 2 and "no CUDA device is available here; use --device cpu" in r.text
