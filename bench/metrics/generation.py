"""TruthfulQA generation metrics from judge verdicts: True%, Info%, and True*Info both ways.

* ``true_info_product`` – the product of the True and Info rates (what ITI and FLORAIN print; across folds the
  product of the fold-averaged rates), standard error by the delta method with the true/info covariance.
* ``true_and_info`` – the share of answers that are both true and informative (allenai/open-instruct's number).
"""

from __future__ import annotations

import math

import numpy as np

from bench.runs import combine_folds, summarise

GEN_METRICS = ("true", "info", "true_and_info", "true_info_product")


def _product(t: dict, i: dict, cov: float) -> dict:
    """``t·i`` with the delta-method standard error ``sqrt(i²se_t² + t²se_i² + 2·t·i·cov)``."""
    var = i["mean"] ** 2 * t["se"] ** 2 + t["mean"] ** 2 * i["se"] ** 2 + 2 * t["mean"] * i["mean"] * cov
    return {"mean": t["mean"] * i["mean"], "se": math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan"),
            "n": t["n"], "cov_true_info": cov}


def generation_metrics(true: list[bool], info: list[bool]) -> dict[str, dict]:
    """Per-fold metrics from per-answer verdicts (``cov_true_info`` = covariance of the two sample means)."""
    if len(true) != len(info) or not true:
        raise ValueError(f"need the same, non-zero number of true and info verdicts, got {len(true)} and {len(info)}")
    t, i = np.asarray(true, float), np.asarray(info, float)
    cov = float(np.cov(t, i)[0, 1] / len(t)) if len(t) > 1 else float("nan")
    st, si = summarise(t.tolist()), summarise(i.tolist())
    return {"true": st, "info": si, "true_and_info": summarise((t * i).tolist()), "true_info_product": _product(st, si, cov)}


def combine_product(true: dict, info: dict, per_fold: list[dict]) -> dict:
    """The product of fold-averaged rates; covariance of the averaged means = Σ cov_f / F²."""
    covs = [f.get("cov_true_info", float("nan")) for f in per_fold]
    return _product(true, info, sum(covs) / len(covs) ** 2)


def combine_fold_metrics(per_fold: list[dict[str, dict]]) -> dict[str, dict]:
    """Every metric over folds as runs report it: the mean of fold means (:func:`bench.runs.combine_folds`), and
    True*Info as the product of the fold-averaged rates (:func:`combine_product`)."""
    combined = {m: combine_folds([f[m] for f in per_fold]) for m in per_fold[0]}
    if "true_info_product" in combined:
        combined["true_info_product"] = combine_product(combined["true"], combined["info"],
                                                        [f["true_info_product"] for f in per_fold])
    return combined
