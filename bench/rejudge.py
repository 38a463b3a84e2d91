"""Re-judge a finished TruthfulQA run's saved answers with today's judge (``bench rejudge``).

Nothing is generated again: each fold's ``generations_foldK.jsonl`` is judged as the runner judges it (verdicts
appended to ``judgements_foldK.jsonl`` under the judge's identity, so an interrupted re-judge continues), and only
the judged numbers change: True, Info, True∧Info, True*Info and each answer's ``p_true``/``p_info``. MC, KL/CE and
fluency stay as computed. The run's ``judge`` becomes the new judge's identity (with its validated error) and a
``rejudged`` entry (date, git state, previous judge, previous metrics) is appended. Files are replaced atomically,
``results.json`` last (fold files too, when present, so that ``--resume`` reuses the new numbers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.data.truthfulqa import Question, checksum, load_truthfulqa
from bench.judges import THRESHOLD, Judge, JudgeItem, get_judge, judge_saved
from bench.metrics.generation import GEN_METRICS, combine_fold_metrics, generation_metrics
from bench.report import patch_fold_files, save_revised_run
from bench.runs import RunFolder, read_progress


def run_judge(cfg: dict, data_dir: str | Path | None = None) -> Judge:
    """The judge a run's config names, with its recorded options, built today."""
    opts = {**({"data_dir": data_dir} if cfg["judge"] == "embedded" else {}), **(cfg.get("judge_options") or {})}
    return get_judge(cfg["judge"], **opts)


def run_questions(results: dict, data_dir: str | Path | None) -> dict[int, Question]:
    """The run's questions by index, checked against the checksum the run recorded."""
    questions, _ = load_truthfulqa(data_dir)
    limit = results["config"].get("limit")
    if limit is not None:
        questions = questions[:limit]
    want = results["data"].get("checksum")
    if want is None:
        raise ValueError("the run recorded no data checksum, so its questions cannot be matched to the data found; "
                         "re-run it instead")
    if checksum(questions) != want:
        raise ValueError(f"the TruthfulQA data found ({len(questions)} questions) is not the data the run used "
                         f"(checksum {checksum(questions)[:12]} ≠ {want[:12]}): pass the --data-dir it used")
    return {q.index: q for q in questions}


def _judge_fold(run_dir: Path, k: int, indices: list[int], questions: dict[int, Question], judge: Judge) -> dict:
    """``{index: (p_true, p_info)}`` for the fold's saved answers (verdicts saved under this judge are reused)."""
    folder = RunFolder(run_dir)
    gens = {r["index"]: r for r in read_progress(folder.generations(k))}
    if missing := [i for i in indices if i not in gens]:
        raise ValueError(f"{folder.generations(k)} lacks the answers to {len(missing)} questions "
                         f"(e.g. {missing[:5]})")
    items = {i: JudgeItem(questions[i].question, gens[i]["answer"], questions[i].correct, questions[i].incorrect)
             for i in indices}
    done = judge_saved(judge, folder.judgements(k), items, chunk=256)
    return {i: (done[i]["p_true"], done[i]["p_info"]) for i in indices}


def _patch(records: list[dict], verdicts: dict) -> None:
    for r in records:
        if r["index"] in verdicts and "p_true" in r:
            r["p_true"], r["p_info"] = verdicts[r["index"]]
            r["true"], r["info"] = r["p_true"] >= THRESHOLD, r["p_info"] >= THRESHOLD


def rejudge_run(run_dir: str | Path, judge: Judge | None = None, data_dir: str | Path | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Re-judge ``run_dir`` with ``judge`` (default: the run's own judge name and options, built today).

    Returns ``{"run", "previous", "metrics", "seconds"}`` (previous and new combined judged metrics)."""
    run_dir, start = Path(run_dir), time.perf_counter()
    folder = RunFolder(run_dir)
    results = folder.read_results()
    cfg = results["config"]
    if "true" not in results["metrics"]:
        raise ValueError(f"{run_dir} has no judged answers (task {cfg.get('task')!r}); nothing to re-judge")
    if judge is None:
        judge = run_judge(cfg, data_dir)
    questions = run_questions(results, data_dir)
    per_question = folder.read_per_question()
    for fold in results["folds"]:
        k = fold["fold"]
        indices = [r["index"] for r in per_question if r.get("fold") == k and "p_true" in r]
        verdicts = _judge_fold(run_dir, k, indices, questions, judge)
        metrics = generation_metrics([verdicts[i][0] >= THRESHOLD for i in indices],
                                     [verdicts[i][1] >= THRESHOLD for i in indices])
        _patch([r for r in per_question if r.get("fold") == k], verdicts)
        fold["metrics"].update(metrics)
        patch_fold_files(run_dir, k, "gen", metrics, lambda recs, where, v=verdicts: _patch(recs, v))
    previous = {m: results["metrics"][m] for m in GEN_METRICS}
    combined = combine_fold_metrics([{m: f["metrics"][m] for m in GEN_METRICS} for f in results["folds"]])
    results["metrics"].update(combined)
    old, results["judge"] = results.get("judge"), judge.identity()
    seconds = time.perf_counter() - start
    save_revised_run(run_dir, results, per_question, "rejudged",
                     {"previous_judge": old, "previous_metrics": previous, "seconds": round(seconds, 2)})
    new = {m: results["metrics"][m] for m in GEN_METRICS}
    echo(f"{run_dir}: " + ", ".join(f"{m} {previous[m]['mean']:.3f} → {new[m]['mean']:.3f}" for m in new))
    return {"run": str(run_dir), "previous": previous, "metrics": new, "seconds": seconds}
