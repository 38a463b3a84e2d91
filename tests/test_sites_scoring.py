import pytest
import torch

from bench.interventions import Intervention
from bench.scoring import Encoded, _trees, answer_logprobs, common_prefix, encode, tree_rows
from bench.sites import edit_tensor, hooked
from florain import LowRankHeadMap


def _florain(lm, layer=1, seed=0):
    heads, dim = lm.spec.site_shape("heads")
    m = LowRankHeadMap(heads, dim, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.s.normal_(0, 2.0)
    return Intervention("florain", "heads", {layer: m}, {"heads": heads, "head_dim": dim})


def _logits(lm, text="Q: What is the capital of France? A: Paris."):
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc).logits


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma"])
def test_hook_changes_output_and_removal_restores_logits(family, request):
    lm = request.getfixturevalue(family)
    base = _logits(lm)
    iv = _florain(lm)
    with iv.applied(lm):
        assert not torch.equal(_logits(lm), base)
    assert torch.equal(_logits(lm), base)
    with pytest.raises(RuntimeError, match="boom"):
        with iv.applied(lm):
            raise RuntimeError("boom")
    assert torch.equal(_logits(lm), base)
    assert not lm.spec.o_proj(lm.model, 1)._forward_pre_hooks


def test_every_row_and_each_positions_own_activation_is_edited():
    x = torch.randn(4, 5, 6)
    calls = []

    def edit(a):
        calls.append(a.shape)
        return a * 2

    out = edit_tensor(x, edit, 2, "last")
    assert torch.equal(out[:, -1], 2 * x[:, -1]) and torch.equal(out[:, :-1], x[:, :-1])
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 2:] = True
    out = edit_tensor(x, edit, 2, mask)
    assert torch.equal(out[:, 2:], 2 * x[:, 2:]) and torch.equal(out[:, :2], x[:, :2])
    with pytest.raises(ValueError, match="shape"):
        edit_tensor(x, edit, 2, torch.ones(3, 5, dtype=torch.bool))


def test_attn_out_site_edits_the_projection_output(tiny_llama):
    lm = tiny_llama
    seen = {}

    def edit(a):
        seen["shape"] = a.shape
        return a

    with hooked(lm.model, lm.spec, 0, "attn-out", edit):
        _logits(lm)
    assert seen["shape"][-2:] == lm.spec.site_shape("attn-out")


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma", "gemma_window_128", "gemma_softcap"])
@pytest.mark.parametrize("with_intervention", [False, True, "all-positions"])
@pytest.mark.parametrize("batch_size", [2, 16])  # 2: a context's answers over several rows; 16: contexts mixed
def test_prefix_cache_matches_plain_scoring(family, with_intervention, batch_size, request):
    """Contexts and their answers' tries as rows (Llama; Gemma-3 when every text fits its window, sliding and full
    layers under one mask; with Gemma's final soft-capping after the gathered head) and context by context
    (tiny_gemma: the texts outgrow its 16-token window) both equal the plain path."""
    from tiny_models import tiny_model

    if family.startswith("gemma_"):
        lm = tiny_model("gemma", seed=1, window=128)
        if family == "gemma_softcap":
            lm.model.config.final_logit_softcapping = 0.5  # small enough to change the random model's log-probs
    else:
        lm = request.getfixturevalue(family)
    # two questions behind a shared instruction: both cache levels (shared prefix, then each question) are used
    instruction = "Interpret each question literally. "
    qa = {"Q: What is the capital of France?\nA: ": ["Paris.", "It is Lyon, I think.", "I have no comment.",
                                                        "Barcelona, Spain.", "No.", "It is Paris.", "It is"],
          "Q: Who wrote Hamlet?\nA: ": ["Shakespeare.", "Marlowe wrote it in 1600."]}
    seqs = [encode(lm, instruction + q + a, len(instruction + q)) for q, answers in qa.items() for a in answers]
    iv = _florain(lm) if with_intervention else None
    if with_intervention == "all-positions":  # a weight-like edit (LoFiT) also changes the cached prefix
        iv.position_policy = "all"
    assert tree_rows(lm, seqs) == (family != "tiny_gemma")
    head_hooks = dict(lm.model.get_output_embeddings()._forward_pre_hooks)
    cached = answer_logprobs(lm, seqs, iv, batch_size=batch_size, prefix_cache=True)
    assert dict(lm.model.get_output_embeddings()._forward_pre_hooks) == head_hooks  # head_at's hook removed
    plain = answer_logprobs(lm, seqs, iv, batch_size=3, prefix_cache=False)
    assert max(abs(a - b) for a, b in zip(cached, plain)) <= 1e-4
    if family == "gemma_softcap":
        lm.model.config.final_logit_softcapping = None
        assert max(abs(a - b) for a, b in zip(answer_logprobs(lm, seqs, iv, prefix_cache=False), plain)) > 1e-3
    if with_intervention:
        none = answer_logprobs(lm, seqs, None, prefix_cache=False)
        assert max(abs(a - b) for a, b in zip(plain, none)) > 1e-3


def _shared_answers(lm):
    instruction = "Answer each question. "
    qa = {"Q: Where is Paris?\nA: ": ["It is in France.", "It is in Spain.", "It is", "It is in France, I think.",
                                     "No comment."],
          "Q: Who is Ada?\nA: ": ["A mathematician.", "A mathematician and writer."]}
    return [encode(lm, instruction + q + a, len(instruction + q)) for q, answers in qa.items() for a in answers]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_answers_that_share_their_first_tokens_share_their_nodes(family):
    """Each context and the trie of its answers is one row: a token shared by several answers of a context (at
    the same place) is fed once, and every answer still gets the log-probs of a plain pass over its own text."""
    from bench.perf import counted_work
    from tiny_models import tiny_model

    lm = tiny_model(family, seed=3, window=128)
    seqs = _shared_answers(lm)
    iv = _florain(lm)
    plain = answer_logprobs(lm, seqs, iv, prefix_cache=False)
    assert answer_logprobs(lm, seqs, iv, batch_size=16) == pytest.approx(plain, abs=1e-4)
    with counted_work(lm) as work:
        assert answer_logprobs(lm, seqs, iv, batch_size=1) == pytest.approx(plain, abs=1e-4)  # no padding
    p = common_prefix(seqs)
    contexts = [tuple(s.ids[p : s.answer[0] - 1]) for s in seqs]  # one row per answer at batch size 1
    nodes = {(tuple(s.ids[: s.answer[0] - 1]), tuple(s.ids[s.answer[0] - 1 : k])) for s in seqs
             for k in range(s.answer[0], s.answer[-1] + 1)}
    assert work["tokens"] == p + sum(map(len, contexts)) + sum(len(s.answer) for s in seqs)
    # the head reads answer-predicting nodes only (and the shared prefix's pass its last position)
    assert work["logit_rows"] == 1 + sum(len(s.answer) for s in seqs)
    unshared = work["tokens"]
    rows = _trees(seqs, p, 0, 5)  # a context's answers in one row: its tokens, then one node per answer prefix
    assert sum(len(t.ids) for t in rows) == sum(map(len, set(contexts))) + len(nodes)
    with counted_work(lm) as work:
        assert answer_logprobs(lm, seqs, iv, batch_size=5) == pytest.approx(plain, abs=1e-4)
    assert work["tokens"] <= unshared - 10  # padding included: "It is" fed once for four answers, ...
    assert work["logit_rows"] == 1 + len(nodes)  # one per node, none for padding or the contexts


def test_an_answer_whose_scored_tokens_skip_one_scores_as_the_plain_path(tiny_llama):
    """A token inside the answer left out of its score (a zero-width token, which :func:`encode` skips) is still
    fed, as in the plain path."""
    ids = tiny_llama.tokenizer("Answer. Q: Where is Paris?\nA: It is in France.")["input_ids"]
    seqs = [Encoded(ids, [len(ids) - 4, len(ids) - 2, len(ids) - 1]), Encoded(ids, list(range(len(ids) - 4, len(ids))))]
    assert answer_logprobs(tiny_llama, seqs) == pytest.approx(answer_logprobs(tiny_llama, seqs, prefix_cache=False),
                                                               abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("how", ["eager", "earlier"])
def test_eager_attention_and_the_earlier_path_score_as_the_plain_path(how, family):
    """Eager attention takes the trees' mask as an additive float mask; the earlier code path scores context by
    context (bench.earlier): both equal the plain path."""
    from tiny_models import tiny_model

    lm = tiny_model(family, seed=4, window=128)
    seqs = _shared_answers(lm)
    iv = _florain(lm)
    plain = answer_logprobs(lm, seqs, iv, prefix_cache=False)
    if how == "eager":
        lm.model.set_attn_implementation("eager")
    else:
        lm.use_earlier_paths()
    assert answer_logprobs(lm, seqs, iv, batch_size=3) == pytest.approx(plain, abs=1e-4)


def test_answer_logprob_equals_direct_computation(tiny_llama):
    lm = tiny_llama
    context, answer = "Q: Where were the Olympics?\nA: ", "Barcelona, Spain."
    enc = encode(lm, context + answer, len(context))
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0], -1)
    direct = sum(float(logp[p - 1, enc.ids[p]]) for p in enc.answer)
    (got,) = answer_logprobs(lm, [enc], prefix_cache=False)
    assert got == pytest.approx(direct, abs=1e-5)
