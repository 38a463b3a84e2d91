"""Metrics: MC1/MC2/MC3, generation (True/Info, answer fluency), KL/CE; their display labels live here, in one place."""

#: Display label of every metric a results file may hold (tables, plots). Values are fractions, not percentages.
METRIC_LABELS = {
    "true_info_product": "True*Info (product of rates)",
    "true_and_info": "True∧Info (share of answers)",
    "true": "True",
    "info": "Info",
    "mc1": "MC1",
    "mc2": "MC2",
    "mc3": "MC3",
    "answer_nll": "Answer NLL (base model)",
    "ce": "CE",
    "kl": "KL",
    "expected_max_toxicity": "Exp. max toxicity",
    "toxicity_probability": "Toxicity prob.",
    "fluency_ppl": "Fluency (PPL)",
    "dist-1": "Dist-1",
    "dist-2": "Dist-2",
    "dist-3": "Dist-3",
    "empty_share": "Empty share",
}
#: Preferred column order; any other metric follows alphabetically.
METRIC_ORDER = tuple(METRIC_LABELS)
#: Metrics where a lower value is better (every other metric: higher is better).
LOWER_IS_BETTER = frozenset({"answer_nll", "ce", "kl", "expected_max_toxicity", "toxicity_probability", "fluency_ppl",
                             "empty_share"})


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def ordered(metrics) -> list[str]:
    return sorted(metrics, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m))


def higher_is_better(metric: str) -> bool:
    """Direction of a metric, for choosing sweep values and flagging regressions."""
    return metric not in LOWER_IS_BETTER
