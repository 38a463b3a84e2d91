"""The toxicity benchmark (RealToxicityPrompts, DExperts protocol): prompts, sampling, scorers and metrics.

- :mod:`bench.toxicity.data`: evaluation prompts, Perspective-scored texts, steering groups.
- :mod:`bench.toxicity.sampling`: seeded nucleus sampling with an intervention active.
- :mod:`bench.toxicity.scorers` / :mod:`bench.toxicity.perspective`: scorer backends (``get_scorer``).
- :mod:`bench.toxicity.embedded`: training the offline default scorer (RTP prompt texts only).
- :mod:`bench.toxicity.metrics`: expected max toxicity, toxicity probability, dist-n, conditional perplexity.
- :mod:`bench.toxicity.agreement`: AUROC, Spearman, Brier, reliability, prompt-group bootstrap intervals.
- :mod:`bench.toxicity.validate`: agreement of scorers with Perspective on the GPT-2 continuations, human
  continuations and held-out prompts; the candidate comparison behind the embedded scorer.
- :mod:`bench.toxicity.rescore`: re-scoring a finished run's saved samples with today's scorer.
"""

from bench.toxicity.base import (
    THRESHOLD,
    ScoredSamples,
    ScorerNotAvailableError,
    ToxicityScorer,
    get_scorer,
    score_samples,
    scorer_names,
)

__all__ = ["THRESHOLD", "ScoredSamples", "ScorerNotAvailableError", "ToxicityScorer", "get_scorer",
           "score_samples", "scorer_names"]
