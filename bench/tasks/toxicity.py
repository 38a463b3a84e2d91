"""Toxicity task (DExperts protocol): sample continuations of RealToxicityPrompts prompts with the intervention
active, score them, and report expected maximum toxicity, toxicity probability, fluency and diversity.

Detoxifying interventions are fitted on desirable (non-toxic) vs undesirable (toxic) texts, grouped (FLORAIN's
regions need groups). Two sources, never overlapping the evaluation prompts:

* ``gpt2-gens`` (default): the 25 Perspective-scored GPT-2 continuations of each of 100 RTP prompts
  (``prompted_gens_gpt2.jsonl``), one group per prompt, the capture text being prompt + continuation. Natural
  groups, but few toxic texts (about 30).
* ``rtp``: the RTP prompt texts themselves (``rtp_toxic_5k`` vs ``rtp_nontoxic_5k``), which have no natural
  grouping: they are dealt at random (seeded) into groups of ``RTP_GROUP`` toxic + ``RTP_GROUP`` non-toxic texts.
  Only the records of the *steering part* (:func:`bench.toxicity.data.rtp_part`, a fixed fifth) are used: the
  rest trains the embedded toxicity scorer, so a fit never sees a text the scorer was trained on.

Neither source shares a text with the embedded scorer's training texts (``gpt2-gens`` is its validation set;
``tests/test_toxicity.py`` checks both on the shared data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.data.truthfulqa import Fold, Question, checksum
from bench.metrics import Metric
from bench.models import LoadedModel, load_model
from bench.runs import append_progress, config_hash, read_progress, summarise
from bench.tasks.base import Inputs, Part, Task, register_part, register_task
from bench.tasks.truthfulqa import EMPTY_SHARE
from bench.toxicity.base import score_samples
from bench.toxicity.data import (
    ToxicityPrompt,
    exclude_prompts,
    load_steering_groups,
    load_toxicity_prompts,
    normalise,
    rtp_part,
)
from bench.toxicity.metrics import (
    conditional_perplexity,
    count_empty,
    distinctness,
    expected_max_toxicity,
    max_toxicity_per_prompt,
    toxicity_probability,
)
from bench.toxicity.sampling import sample_continuations

STEER_SOURCES = ("gpt2-gens", "rtp")
RTP_GROUP = 50
TOXICITY_METHODS = ("none", "florain", "iti", "caa", "mean-diff-resid", "mean-shift")
TOXICITY_METRICS = (
    Metric("expected_max_toxicity", "Exp. max toxicity", "score 0–1", higher_is_better=False, column=10,
           sweep_plot=True),
    Metric("toxicity_probability", "Toxicity prob.", "fraction of prompts", higher_is_better=False, column=11),
    Metric("fluency_ppl", "Fluency (PPL)", "perplexity", higher_is_better=False, column=12, sweep_plot=True),
    *(Metric(f"dist-{n}", f"Dist-{n}", column=12 + n) for n in (1, 2, 3)),
    EMPTY_SHARE,
)


def evaluation_prompts(name: str, data_dir: str | Path | None, limit: int | None, split: str = "test"
                       ) -> tuple[list[ToxicityPrompt], list[ToxicityPrompt], str]:
    """``(prompts to evaluate, prompts the fitting texts must avoid, source)``.

    ``split="test"``: the first ``limit`` prompts of the set (all without ``limit``). ``split="val"`` (tuning, e.g.
    a strength sweep): the *last* ``limit`` prompts, disjoint from the test prompts, so it needs ``limit`` with
    2 × ``limit`` ≤ the set's size; the fitting texts then avoid both the validation and the test prompts.
    """
    if split == "test":
        prompts, source = load_toxicity_prompts(name, data_dir, limit)
        return prompts, prompts, source
    if split != "val":
        raise ValueError(f"unknown evaluation split {split!r}; valid: test, val")
    every, source = load_toxicity_prompts(name, data_dir)
    if limit is None or 2 * limit > len(every):
        raise ValueError(f"toxicity validation prompts are the last --limit N of the {len(every)} prompts, disjoint "
                         f"from the test prompts (the first N): pass --limit N with N ≤ {len(every) // 2}")
    return every[-limit:], every[:limit] + every[-limit:], source


def steering_questions(source: str, eval_prompts: list[ToxicityPrompt], data_dir: str | Path | None,
                       seed: int) -> list[Question]:
    """Fitting data as :class:`Question` groups: ``question`` = the prompt ("" for RTP texts), ``correct`` = the
    desirable continuations/texts, ``incorrect`` = the undesirable ones."""
    if source == "gpt2-gens":
        groups = exclude_prompts(load_steering_groups(data_dir), eval_prompts)
        return [Question(i, g.prompt, "", tuple(g.desirable), tuple(g.undesirable)) for i, g in enumerate(groups)]
    if source == "rtp":
        from bench.data.toxicity import load_prompt_texts

        banned = {normalise(p.text) for p in eval_prompts}

        def usable(t: str) -> bool:
            return normalise(t) not in banned and rtp_part(t) == "steering"

        toxic = [t for t in load_prompt_texts("toxic", data_dir)[0] if usable(t)]
        clean = [t for t in load_prompt_texts("nontoxic", data_dir)[0] if usable(t)]
        rng = np.random.RandomState(seed)
        toxic = [toxic[i] for i in rng.permutation(len(toxic))]
        clean = [clean[i] for i in rng.permutation(len(clean))]
        n = min(len(toxic), len(clean)) // RTP_GROUP
        return [Question(i, "", "", tuple(clean[i * RTP_GROUP:(i + 1) * RTP_GROUP]),
                         tuple(toxic[i * RTP_GROUP:(i + 1) * RTP_GROUP])) for i in range(n)]
    raise ValueError(f"unknown steering data {source!r}; valid: {', '.join(STEER_SOURCES)}")


def steering_fold(n: int, val_ratio: float, seed: int) -> Fold:
    """All groups for fitting: ``1 − val_ratio`` train, ``val_ratio`` validation (seeded); no test groups."""
    if n < 2:
        raise ValueError(f"need at least 2 steering groups, got {n}")
    perm = np.random.RandomState(seed).permutation(n)
    n_val = max(1, int(round(n * val_ratio))) if val_ratio > 0 else 0
    return Fold(0, tuple(sorted(int(i) for i in perm[n_val:])), tuple(sorted(int(i) for i in perm[:n_val])), ())


def evaluate_toxicity(lm: LoadedModel, prompts: list[ToxicityPrompt], intervention, scorer, fluency_lm: LoadedModel,
                      samples_file: Path, n_samples: int = 25, max_new_tokens: int = 20, top_p: float = 0.9,
                      seed: int = 0, batch_size: int = 50, echo: Callable[[str], None] = print,
                      prefix_cache: bool = True, score_batch_size: int = 32) -> dict:
    """Sample (resuming from ``samples_file``), score, and summarise; returns ``{"metrics", "records", "counts",
    "stages"}`` (``prefix_cache=False``: the earlier sampling path, see :func:`sample_continuations`; ``stages``:
    seconds spent sampling — in this process only, so a resumed run's earlier samples are not
    counted —, scoring toxicity and scoring fluency; ``score_batch_size`` continuations per fluency pass)."""
    done = {r["index"]: r for r in read_progress(samples_file)}
    if done:
        echo(f"toxicity: reusing the samples of {len(done)} prompts")
    todo = [i for i in range(len(prompts)) if i not in done]

    def save(index: int, samples: list[str]) -> None:
        rec = {"index": index, "id": prompts[index].id, "prompt": prompts[index].text, "samples": samples}
        append_progress(samples_file, [rec])
        done[index] = rec

    t0 = time.perf_counter()
    if todo:
        sample_continuations(lm, [prompts[i].text for i in todo], n_samples, max_new_tokens, top_p, seed,
                             batch_size, intervention, on_prompt=save, indices=todo,
                             progress=f"sampling ({len(todo)} prompts × {n_samples})", prefix_cache=prefix_cache)
    samples = [done[i]["samples"] for i in range(len(prompts))]
    t1 = time.perf_counter()
    scored = score_samples(scorer, samples)
    t2 = time.perf_counter()
    flat_p = [prompts[i].text for i, s in enumerate(samples) for _ in s]
    flat_c = [c for s in samples for c in s]
    ppl = conditional_perplexity(fluency_lm, flat_p, flat_c, score_batch_size,
                                 progress=f"fluency ({len(flat_c)} continuations)")
    stages = {"sampling_s": t1 - t0, "sampled_prompts": len(todo), "toxicity_scoring_s": t2 - t1,
              "fluency_s": time.perf_counter() - t2}
    metrics = {"expected_max_toxicity": expected_max_toxicity(scored.scores),
               "toxicity_probability": toxicity_probability(scored.scores),
               "fluency_ppl": ppl["summary"], **distinctness(samples)}
    maxima = max_toxicity_per_prompt(scored.scores)
    records, pos = [], 0
    for i, p in enumerate(prompts):
        k = len(samples[i])
        vals = [v for v in ppl["values"][pos:pos + k] if v is not None]
        records.append({"index": i, "id": p.id, "max_toxicity": maxima[i], "scores": scored.scores[i],
                        "mean_ppl": float(np.mean(vals)) if vals else None})
        pos += k
    counts = {"samples": scored.n_samples, "empty": count_empty(samples), "ppl_dropped_high": ppl["n_dropped_high"],
              "ppl_no_tokens": ppl["n_no_tokens"], "max_perplexity": ppl["max_perplexity"]}
    metrics["empty_share"] = summarise([float(not c.strip()) for c in flat_c]) if flat_c else summarise([0.0])
    return {"metrics": metrics, "records": records, "counts": counts, "stages": stages}


# ---------------------------------------------------------------------------------------------- the task

def toxicity_inputs(cfg, data_dir, echo) -> Inputs:
    """The evaluation prompts (``inputs.extra["prompts"]``) and the steering texts, grouped as questions, for
    one fit (no test groups: the prompts are the test set)."""
    prompts, avoid, source = evaluation_prompts(cfg.tox_prompts, data_dir, cfg.limit, cfg.eval_split)
    questions = steering_questions(cfg.steer_data, avoid, data_dir, cfg.seed)
    data_sum = config_hash({"steering": checksum(questions), "prompts": [p.text for p in prompts]})
    data = {"prompts": source, "n_prompts": len(prompts), "steering": cfg.steer_data,
            "n_steering_groups": len(questions), "checksum": data_sum}
    return Inputs(questions, [steering_fold(len(questions), cfg.val_ratio, cfg.seed)], data_sum, data,
                  {"prompts": prompts})


def _scorer(state):
    if "scorer" not in state.shared:
        from bench.toxicity.base import get_scorer

        cfg = state.cfg
        state.shared["scorer"] = get_scorer(cfg.scorer, **state.backend_options(cfg.scorer, cfg.scorer_options))
    return state.shared["scorer"]


def _fluency_lm(state) -> LoadedModel:
    if "fluency_lm" not in state.shared:
        cfg = state.cfg
        state.shared["fluency_lm"] = (state.lm if cfg.fluency_model == cfg.model
                                      else load_model(cfg.fluency_model, cfg.device, cfg.dtype))
    return state.shared["fluency_lm"]


def _part(state, k: int, items: list, iv) -> dict:
    cfg = state.cfg
    return evaluate_toxicity(state.lm, state.inputs.extra["prompts"], iv, _scorer(state), _fluency_lm(state),
                             state.folder.samples(k), cfg.samples, cfg.max_new_tokens, cfg.top_p, cfg.seed,
                             cfg.sample_batch_size, state.echo, prefix_cache=not cfg.legacy_paths,
                             score_batch_size=cfg.score_batch_size)


def _finish(state, folds: list[dict], results: dict) -> None:
    results["data"]["counts"] = folds[0].get("counts")
    results["scorer"] = {**_scorer(state).identity(), "fluency_model": _fluency_lm(state).identity}


def _problems(cfg) -> list[str]:
    from bench.toxicity.base import scorer_names

    problems = []
    if cfg.method not in TOXICITY_METHODS:
        problems.append(f"{cfg.method} has no detoxifying variant; --task toxicity takes: {', '.join(TOXICITY_METHODS)}")
    if cfg.steer_data not in STEER_SOURCES:
        problems.append(f"unknown --steer-data {cfg.steer_data!r}; valid: {', '.join(STEER_SOURCES)}")
    if cfg.scorer not in scorer_names():
        problems.append(f"unknown toxicity scorer {cfg.scorer!r}; valid: {', '.join(scorer_names())}")
    return problems


def _fold_record(res: dict) -> dict:
    return {"counts": res.get("counts"), **({"timings": {"toxicity_stages": res["stages"]}} if "stages" in res else {})}


register_part(Part("toxicity", _part, TOXICITY_METRICS, fold_record=_fold_record, finish=_finish))
register_task(Task("toxicity", "RealToxicityPrompts continuations (DExperts protocol): expected maximum toxicity, "
                   "toxicity probability, fluency, diversity", ("toxicity",), toxicity_inputs, items="prompts",
                   max_new_tokens=20, single_fit=True, text_format="continuation", problems=_problems,
                   settings=("tox_prompts", "samples", "top_p", "scorer", "fluency_model", "steer_data",
                             "sample_batch_size", "score_batch_size"),
                   evaluated=lambda inputs, items: len(inputs.extra["prompts"])))
