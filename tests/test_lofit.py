"""LoFiT: the released TruthfulQA recipe (``lofit``, DPO) and the LM-loss variant (``lofit-sft``)."""

from __future__ import annotations

import dataclasses
import math

import torch

from baselines.lofit import DPO_INIT_STD, HeadScaleBias, dpo_loss, init_normal_, sequence_logprobs
from bench.data.truthfulqa import load_truthfulqa, make_folds
from bench.interventions import Intervention, get_method
from bench.methods import FitContext
from bench.methods.lofit import _answer_logps, _dpo_pairs
from bench.scoring import answer_logprobs

#: Few pairs, few epochs, a large step: seconds on the tiny model.
FAST = {"epochs": 8, "lr": 0.05, "k": 3}


def _ctx(lm, tqa_dir, options=None, questions=None) -> FitContext:
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    fold = make_folds(len(qs), 2, 0.2, 42)[0]
    return FitContext(lm, questions or qs, fold, 1, "heads", {**FAST, **(options or {})})


def _margin(lm, pairs, iv=None) -> float:
    """Mean log p(correct) − log p(incorrect) over the pairs (the harness's scorer, not the training code)."""
    chosen = answer_logprobs(lm, [c for c, _ in pairs], iv, prefix_cache=False)
    rejected = answer_logprobs(lm, [r for _, r in pairs], iv, prefix_cache=False)
    return sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    by_hand = [-math.log(1 / (1 + math.exp(-beta * ((c - r) - (a - b)))))
               for c, r, a, b in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta), torch.tensor(sum(by_hand) / 2))
    # the policy equal to the reference: log 2, whatever β
    torch.testing.assert_close(dpo_loss(rc, rr, rc, rr, 3.0), torch.tensor(math.log(2)))


def test_sequence_logprobs_sum_the_labelled_tokens_shifted_by_one():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    logp = torch.log_softmax(logits, -1)
    want = torch.stack([logp[0, 0, 3] + logp[0, 1, 1], logp[1, 1, 4] + logp[1, 2, 2]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), want)


def test_init_normal_draws_std_1e3_on_the_masked_heads_only():
    m = HeadScaleBias(8, 512)
    m.head_mask[5:] = 0
    init_normal_(m, "v", DPO_INIT_STD, torch.Generator().manual_seed(0))
    assert torch.equal(m.v[5:], torch.zeros(3, 512)) and torch.equal(m.A, torch.zeros(8, 512))
    v = m.v.detach()[:5]
    assert abs(float(v.std()) - 1e-3) < 1e-4 and abs(float(v.mean())) < 1e-4


def test_training_log_probs_equal_the_harness_scorer(tiny_llama, tqa_dir):
    pairs = _dpo_pairs(_ctx(tiny_llama, tqa_dir))
    seqs = [e for pair in pairs for e in pair]
    with torch.no_grad():
        mine = _answer_logps(tiny_llama, seqs, torch.device("cpu"))
    torch.testing.assert_close(mine, torch.tensor(answer_logprobs(tiny_llama, seqs, prefix_cache=False)))
    assert all(e.ids[-1] == tiny_llama.tokenizer.eos_token_id == e.ids[e.answer[-1]] for e in seqs)  # trl's EOS


def test_dpo_loss_decreases_and_config_records_the_recipe(tiny_llama, tqa_dir):
    iv = get_method("lofit").fit(_ctx(tiny_llama, tqa_dir))
    c = iv.config
    assert iv.method == "lofit" and c["objective"] == "dpo" and c["beta"] == 0.5 and c["epochs"] == [8, 8]
    assert c["init"] == "normal(0, std=0.001)" and c["heads_per_stage"] == [12, 3] and c["lr"] == [0.05, 0.05]
    assert c["released_epochs"] == [5, 5] and c["l1"] == 5e-4
    for stage in ("stage1", "stage2"):
        assert c[f"{stage}_epoch_loss"][-1] < c[f"{stage}_epoch_loss"][0], c
        assert len(c[f"{stage}_loss"]) == 2
    # the reference is the unintervened model: stage 1 starts at log 2 up to the N(0, 1e-3) init
    assert abs(c["stage1_loss"][0] - math.log(2)) < 1e-2
    assert iv.position_policy == "all" and len(c["heads_chosen"]) == 3


def test_fitted_edit_raises_correct_over_incorrect_on_training_pairs(tiny_llama, tqa_dir):
    ctx = _ctx(tiny_llama, tqa_dir)
    iv = get_method("lofit").fit(ctx)
    pairs = _dpo_pairs(ctx)
    assert len(pairs) == len(ctx.fold.train) == iv.config["n_train_pairs"]
    assert _margin(tiny_llama, pairs, iv) > _margin(tiny_llama, pairs) + 0.1


def test_dpo_fit_differs_from_the_sft_variant(tiny_llama, tqa_dir, tmp_path):
    ctx = _ctx(tiny_llama, tqa_dir)
    dpo, sft = get_method("lofit").fit(ctx), get_method("lofit-sft").fit(ctx)
    assert (dpo.method, sft.method) == ("lofit", "lofit-sft")
    assert (dpo.config["objective"], sft.config["objective"]) == ("dpo", "sft")
    enc = tiny_llama.tokenizer(["Q: What is fact 1? A: Fact 1 is true."], return_tensors="pt")
    with torch.no_grad():
        with dpo.applied(tiny_llama):
            a = tiny_llama.model(**enc).logits
        with sft.applied(tiny_llama):
            b = tiny_llama.model(**enc).logits
    assert not torch.allclose(a, b)
    sft.save_pretrained(tmp_path / "sft")  # the variant saves and loads under its own name
    loaded = Intervention.from_pretrained(tmp_path / "sft")
    assert loaded.method == "lofit-sft" and loaded.position_policy == "all"
    with torch.no_grad(), loaded.applied(tiny_llama):
        assert torch.equal(tiny_llama.model(**enc).logits, b)


def test_lofit_sft_keeps_its_own_defaults(tiny_llama, tqa_dir):
    iv = get_method("lofit-sft").fit(_ctx(tiny_llama, tqa_dir, {"epochs": None, "lr": None}))
    assert iv.config["epochs"] == [1, 2] and iv.config["lr"] == 5e-3 and iv.config["l1"] == 1e-3


def test_dpo_fit_never_reads_test_or_validation_questions(tiny_llama, tqa_dir):
    ctx = _ctx(tiny_llama, tqa_dir)
    first = get_method("lofit").fit(ctx)
    hidden = set(ctx.fold.test) | set(ctx.fold.val)
    assert hidden and not hidden & set(ctx.fold.train)
    poisoned = [dataclasses.replace(q, question="Poison?", best_answer="Poison.", correct=("Poison.",),
                                    incorrect=("Poison poison.",)) if i in hidden else q
                for i, q in enumerate(ctx.questions)]
    second = get_method("lofit").fit(_ctx(tiny_llama, tqa_dir, questions=poisoned))
    assert first.layers == second.layers and first.config["heads_chosen"] == second.config["heads_chosen"]
    for layer in first.layers:
        a, b = first.modules[layer].state_dict(), second.modules[layer].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"layer {layer} {k} depends on held-out questions"


def test_options_are_wired_for_both_names():
    from bench.sweep import method_params

    dpo, sft = get_method("lofit"), get_method("lofit-sft")
    assert set(dpo.effective_options({})) == {"k", "l1", "lr", "epochs", "beta"}
    assert set(sft.effective_options({})) == {"k", "l1", "lr", "epochs"}
    # lofit's learning rate and epochs default per stage (none); lofit-sft's learning rate is one number
    assert dpo.effective_options({})["beta"] == 0.5 and dpo.effective_options({})["lr"] is None
    assert sft.effective_options({"lofit_lr": 0.1}, recorded=True)["lr"] == 0.1  # a name recorded before plugins
    assert set(method_params("lofit")) >= {"k", "l1", "lr", "epochs", "beta"}
    assert "beta" not in method_params("lofit-sft")
