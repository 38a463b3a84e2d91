"""lm-evaluation-harness integration: a model type ``intervened`` that applies a saved intervention, and local
TruthfulQA task configs so lm-eval's own truthfulqa_mc1/mc2 run offline on the CSV.

lm-eval discovers models through its registry, so this module must be imported before lm-eval resolves
``--model intervened``: use the ``bench-lm-eval`` command (lm-eval's CLI with this plugin loaded), or import
``bench.lm_eval_plugin`` before calling ``lm_eval.simple_evaluate``.

    bench-lm-eval run --model intervened \\
        --model_args pretrained=smollm2-135m,intervention=results/runs/<run>/intervention_fold0 --tasks ...
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lm_eval
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from bench.data.truthfulqa import Question
from bench.interventions import Intervention
from bench.models import LoadedModel, load_model

# Log-likelihood requests edit every token. ``last`` is refused: lm-eval right-pads these batches without an
# attention mask, so the last column of a shorter row is padding, and the position is not where a row ends.
POSITIONS = ("all",)


@register_model("intervened")
class InterventionLM(HFLM):
    """lm-eval's HF model with a saved intervention active.

    Model args: ``pretrained`` (registry alias, Hub id or local directory), ``intervention`` (a saved
    intervention directory; omit for the plain model), ``positions`` (log-likelihood requests: ``all`` tokens,
    the only policy), ``device``, ``dtype``; other HFLM args (e.g. ``batch_size``) pass through.
    Generation requests always use the generation policy: the last prompt token and every generated token.
    """

    def __init__(self, pretrained: str | LoadedModel, intervention: str | Intervention | None = None,
                 positions: str = "all", device: str | None = None, dtype: str | None = None, **kwargs):
        if positions not in POSITIONS:
            why = (" ('last' would edit a padding column in every row shorter than its batch's longest: lm-eval "
                   "right-pads log-likelihood batches; generation requests already use the last-token policy)"
                   if positions == "last" else "")
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}{why}")
        lm = pretrained if isinstance(pretrained, LoadedModel) else load_model(str(pretrained), device=device, dtype=dtype)
        self._bench_lm = lm
        if isinstance(intervention, (str, Path)):
            intervention = Intervention.from_pretrained(intervention)
        self._intervention = intervention
        if self._intervention is not None:
            if not self._intervention.modules:
                raise ValueError(f"{intervention} is a prompt-only method ({self._intervention.method}); "
                                 "use lm-eval's --num_fewshot instead")
            self._intervention.check_model(lm)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, **kwargs)

    def _active(self, positions: str):
        if self._intervention is None:
            return contextlib.nullcontext()
        return self._intervention.applied(self._bench_lm, positions=positions)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._active("all"):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._active("last"):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def write_truthfulqa_tasks(questions: list[Question], directory: str | Path) -> list[str]:
    """Write a local ``multiple_choice``-layout JSONL built from the CSV records (mc1 = best + incorrect,
    mc2 = correct + incorrect, answers with trailing periods) and task YAMLs that reuse lm-eval's own
    truthfulqa_mc1/mc2 configs with that file. Returns the task names (use ``include_path=directory``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "truthfulqa_mc.jsonl"
    with data.open("w") as fh:
        for q in questions:
            fh.write(json.dumps({
                "question": q.question,
                "mc1_targets": {"choices": [q.best_answer, *q.incorrect], "labels": [1] + [0] * len(q.incorrect)},
                "mc2_targets": {"choices": [*q.correct, *q.incorrect],
                                "labels": [1] * len(q.correct) + [0] * len(q.incorrect)},
            }) + "\n")
    stock = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    names = []
    for which in ("mc1", "mc2"):
        name = f"bench_truthfulqa_{which}"
        (directory / f"{name}.yaml").write_text(
            f"include: {stock / f'truthfulqa_{which}.yaml'}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    validation: {data}\n"
        )
        names.append(name)
    return names


def main() -> None:  # pragma: no cover - thin wrapper around lm-eval's CLI
    """``bench-lm-eval``: lm-eval's command line with the ``intervened`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
