"""Re-score a finished toxicity run's saved samples with the current scorer (``bench toxicity rescore``).

Nothing is generated again: each fold's ``samples_foldK.jsonl`` is scored as :func:`bench.tasks.toxicity.evaluate_toxicity`
scores it, and only the toxicity numbers change — expected maximum toxicity, toxicity probability, each sample's
score and each prompt's maximum. Fluency, diversity, counts and timings stay as they were computed. The run's
``scorer`` identity becomes the new scorer's and a ``rescored`` entry (date, git state, previous scorer identity
and previous metrics) is appended. Files are replaced atomically one by one, ``results.json`` last (fold files too,
when present, so that ``--resume`` reuses the new numbers); rerunning after an interruption redoes the whole job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import patch_fold_files, save_revised_run
from bench.runs import RunFolder, combine_folds
from bench.toxicity.base import ToxicityScorer, get_scorer, score_samples
from bench.toxicity.metrics import expected_max_toxicity, max_toxicity_per_prompt, toxicity_probability

TOXICITY_SCORE_METRICS = ("expected_max_toxicity", "toxicity_probability")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_scorer(cfg: dict, data_dir: str | Path | None = None) -> ToxicityScorer:
    """The scorer a run's config names, with its recorded options, built today."""
    opts = {**({"data_dir": data_dir} if cfg["scorer"] == "embedded" else {}), **(cfg.get("scorer_options") or {})}
    return get_scorer(cfg["scorer"], **opts)


def fold_samples(run_dir: Path, fold: int, n_prompts: int) -> list[list[str]]:
    """Every prompt's saved samples in prompt order (the last record of an index wins, as when resuming)."""
    path = RunFolder(run_dir).samples(fold)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a toxicity run keeps its samples there")
    done = {r["index"]: r["samples"] for r in _read_jsonl(path)}
    missing = [i for i in range(n_prompts) if i not in done]
    if missing:
        raise ValueError(f"{path} lacks the samples of {len(missing)} prompts (e.g. {missing[:5]}): an unfinished run")
    return [done[i] for i in range(n_prompts)]


def _patch_records(records: list[dict], scores: list[list[float]], where: str, fold: int | None = None) -> None:
    """Replace ``scores`` and ``max_toxicity`` of the per-prompt records (of ``fold``, when given) in place."""
    maxima = max_toxicity_per_prompt(scores)
    for r in records:
        if fold is not None and r.get("fold") != fold:
            continue
        i = r["index"]
        if len(r.get("scores", [])) != len(scores[i]):
            raise ValueError(f"{where}: prompt {i} has {len(r.get('scores', []))} scores but {len(scores[i])} samples")
        r["scores"], r["max_toxicity"] = scores[i], maxima[i]


def rescore_run(run_dir: str | Path, scorer: ToxicityScorer | None = None, data_dir: str | Path | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Re-score ``run_dir`` with ``scorer`` (default: the run's own scorer name and options, built today).

    Returns ``{"run", "previous", "metrics", "seconds"}`` (previous and new combined toxicity metrics)."""
    run_dir, start = Path(run_dir), time.perf_counter()
    folder = RunFolder(run_dir)
    results = folder.read_results()
    cfg = results["config"]
    if cfg.get("task") != "toxicity":
        raise ValueError(f"{run_dir} is a {cfg.get('task')!r} run, not a toxicity run")
    if scorer is None:
        scorer = run_scorer(cfg, data_dir)
    per_question = folder.read_per_question()
    for fold in results["folds"]:
        k, n = fold["fold"], fold["metrics"]["expected_max_toxicity"]["n"]
        scores = score_samples(scorer, fold_samples(run_dir, k, n)).scores
        metrics = {"expected_max_toxicity": expected_max_toxicity(scores),
                   "toxicity_probability": toxicity_probability(scores)}
        _patch_records(per_question, scores, str(folder.per_question), fold=k)
        fold["metrics"].update(metrics)
        patch_fold_files(run_dir, k, "toxicity", metrics,
                         lambda recs, where, sc=scores: _patch_records(recs, sc, where))
    previous = {m: results["metrics"][m] for m in TOXICITY_SCORE_METRICS}
    for m in TOXICITY_SCORE_METRICS:
        results["metrics"][m] = combine_folds([f["metrics"][m] for f in results["folds"]])
    old = results.get("scorer") or {}
    results["scorer"] = {**scorer.identity(), **({"fluency_model": old["fluency_model"]} if "fluency_model" in old else {})}
    seconds = time.perf_counter() - start
    save_revised_run(run_dir, results, per_question, "rescored",
                     {"previous_scorer": old, "previous_metrics": previous, "seconds": round(seconds, 2)})
    new = {m: results["metrics"][m] for m in TOXICITY_SCORE_METRICS}
    echo(f"{run_dir}: " + ", ".join(f"{m} {previous[m]['mean']:.3f} → {new[m]['mean']:.3f}" for m in new))
    return {"run": str(run_dir), "previous": previous, "metrics": new, "seconds": seconds}
