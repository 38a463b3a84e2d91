"""Few-shot prompting (``baselines/few_shot.py``): a prompt transform with no activation edit."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.few_shot import DEFAULT_SHOTS, few_shot_prefix
from bench.interventions import Intervention, method
from bench.methods.context import FitContext
from bench.methods.none import build_none
from bench.options import option


@dataclass(frozen=True)
class FewShotOptions:
    """few-shot's options (the paper's N is not recorded in the released code: ours, see baselines/few_shot.py)."""

    shots: int = option(DEFAULT_SHOTS, "number of training-fold question/best-answer examples (0: none)", low=0,
                        label="few-shot examples (questions)")


@method("few-shot", "few-shot prompting with training-fold questions", build=build_none, options=FewShotOptions,
        needs_layer=False)
def fit(ctx: FitContext, options: FewShotOptions) -> Intervention:
    """Prepend N question/best-answer pairs from the fold's training questions (never test questions)."""
    shots = options.shots
    train = [ctx.questions[i] for i in ctx.fold.train]
    prefix = few_shot_prefix([(q.question, q.best_answer) for q in train], shots)
    return Intervention("few-shot", ctx.site, {}, {"shots": shots, "heads": None, "head_dim": None,
                                                   "example_questions": [q.index for q in train[:shots]]}, prefix)

