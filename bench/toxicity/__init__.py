"""The toxicity benchmark (RealToxicityPrompts, DExperts protocol): prompts, sampling, scorers and metrics.

- :mod:`bench.toxicity.data`: evaluation prompts, Perspective-scored texts, steering groups.
- :mod:`bench.toxicity.sampling`: seeded nucleus sampling with an intervention active.
- :mod:`bench.toxicity.scorers` / :mod:`bench.toxicity.perspective`: scorer backends (``get_scorer``).
- :mod:`bench.toxicity.embedded`: training the offline default scorer.
- :mod:`bench.toxicity.metrics`: expected max toxicity, toxicity probability, dist-n, conditional perplexity.
- :mod:`bench.toxicity.validate`: agreement of scorers with Perspective on held-out texts.
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
