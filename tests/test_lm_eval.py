"""lm-eval integration: the ``intervened`` model type, and parity of our lm-eval-mode MC1/MC2 with lm-eval's
own truthfulqa_mc1/mc2 tasks on local data."""

import lm_eval
import pytest
import torch

from bench.data.truthfulqa import load_truthfulqa
from bench.interventions import Intervention
from bench.tasks.truthfulqa_mc import evaluate_mc
from florain import LowRankHeadMap


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("tiny-llama-lmeval")
    tiny_llama.model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return path


def _lm_eval_scores(pretrained, questions, tmp_path, **model_args):
    from lm_eval.tasks import TaskManager

    from bench.lm_eval_plugin import InterventionLM, write_truthfulqa_tasks

    names = write_truthfulqa_tasks(questions, tmp_path / "tasks")
    model = InterventionLM(pretrained=str(pretrained), batch_size=4, device="cpu", **model_args)
    out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    return {n.rsplit("_", 1)[1]: out["results"][n]["acc,none"] for n in names}


def _ours(lm, questions, intervention=None):
    recs = evaluate_mc(lm, questions, intervention, mode="lm-eval", batch_size=4)
    return {m: sum(r[m] for r in recs) / len(recs) for m in ("mc1", "mc2")}


def test_parity_with_lm_eval_tasks_on_tiny_model(tiny_llama, tiny_dir, tqa_dir, tmp_path):
    questions, _ = load_truthfulqa(tqa_dir, use_hub=False)
    theirs = _lm_eval_scores(tiny_dir, questions, tmp_path)
    ours = _ours(tiny_llama, questions)
    assert abs(theirs["mc1"] - ours["mc1"]) <= 1e-4
    assert abs(theirs["mc2"] - ours["mc2"]) <= 1e-4


def test_parity_with_lm_eval_on_smollm2_subset(smollm2, shared_data, tmp_path):
    questions, _ = load_truthfulqa(shared_data, use_hub=False)
    # the first questions, and two whose answers start with a digit (" 10%.", " 300 Spartans…"): the tokenizer keeps
    # the delimiter space as its own token there, and lm-eval scores it as part of the continuation
    questions = questions[:4] + [questions[345], questions[688]]
    theirs = _lm_eval_scores("smollm2-135m", questions, tmp_path)
    ours = _ours(smollm2, questions)
    assert abs(theirs["mc1"] - ours["mc1"]) <= 1e-4
    assert abs(theirs["mc2"] - ours["mc2"]) <= 1e-4


def test_plugin_applies_a_saved_intervention(tiny_llama, tiny_dir, tqa_dir, tmp_path):
    heads, dim = tiny_llama.spec.site_shape("heads")
    m = LowRankHeadMap(heads, dim, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.s.normal_(0, 3.0)
    Intervention("florain", "heads", {1: m}, {"heads": heads, "head_dim": dim}).save_pretrained(tmp_path / "iv")
    questions, _ = load_truthfulqa(tqa_dir, use_hub=False)
    plain = _lm_eval_scores(tiny_dir, questions, tmp_path / "a")
    steered = _lm_eval_scores(tiny_dir, questions, tmp_path / "b", intervention=str(tmp_path / "iv"))
    assert steered["mc2"] != pytest.approx(plain["mc2"], abs=1e-6)


def test_plugin_refuses_a_last_position_policy_for_log_likelihoods(tiny_dir):
    """lm-eval right-pads log-likelihood batches: a last-column edit would land on padding, so it is refused."""
    from bench.lm_eval_plugin import InterventionLM

    with pytest.raises(ValueError, match="positions must be one of \\('all',\\), got 'last'.*right-pads"):
        InterventionLM(pretrained=str(tiny_dir), positions="last")
    with pytest.raises(ValueError, match="got 'every'"):
        InterventionLM(pretrained=str(tiny_dir), positions="every")
