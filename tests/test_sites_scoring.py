import pytest
import torch

from bench.interventions import Intervention
from bench.scoring import answer_logprobs, common_prefix, encode
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


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma"])
@pytest.mark.parametrize("with_intervention", [False, True, "all-positions"])
@pytest.mark.parametrize("batch_size", [2, 16])  # 2: a context's answers over several batches; 16: contexts mixed
def test_prefix_cache_matches_plain_scoring(family, with_intervention, batch_size, request):
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
    cached = answer_logprobs(lm, seqs, iv, batch_size=batch_size, prefix_cache=True)
    plain = answer_logprobs(lm, seqs, iv, batch_size=3, prefix_cache=False)
    assert max(abs(a - b) for a, b in zip(cached, plain)) <= 1e-4
    if with_intervention:
        none = answer_logprobs(lm, seqs, None, prefix_cache=False)
        assert max(abs(a - b) for a, b in zip(plain, none)) > 1e-3


def _shared_answers(lm):
    instruction = "Answer each question. "
    qa = {"Q: Where is Paris?\nA: ": ["It is in France.", "It is in Spain.", "It is", "It is in France, I think.",
                                     "No comment."],
          "Q: Who is Ada?\nA: ": ["A mathematician.", "A mathematician and writer."]}
    return [encode(lm, instruction + q + a, len(instruction + q)) for q, answers in qa.items() for a in answers]


def test_answers_that_share_their_first_tokens_share_their_nodes():
    """Each context and the trie of its answers is one row: a token shared by several answers of a context (at
    the same place) is fed once, and every answer still gets the log-probs of a plain pass over its own text."""
    from bench.perf import counted_work
    from tiny_models import tiny_model

    lm = tiny_model("llama", seed=3)
    seqs = _shared_answers(lm)
    iv = _florain(lm)
    plain = answer_logprobs(lm, seqs, iv, prefix_cache=False)
    with counted_work(lm) as work:
        cached = answer_logprobs(lm, seqs, iv, batch_size=1)  # one context per pass: no padding
    assert cached == pytest.approx(plain, abs=1e-4)
    p = common_prefix(seqs)
    contexts = {tuple(s.ids[p : s.answer[0] - 1]) for s in seqs}
    nodes = {(tuple(s.ids[: s.answer[0] - 1]), tuple(s.ids[s.answer[0] - 1 : k])) for s in seqs
             for k in range(s.answer[0], s.answer[-1] + 1)}
    assert work["tokens"] == p + sum(map(len, contexts)) + len(nodes)
    unshared = p + sum(map(len, contexts)) + sum(len(s.answer) for s in seqs)
    assert work["tokens"] <= unshared - 10


@pytest.mark.parametrize("how", ["eager", "earlier"])
def test_eager_attention_and_the_earlier_path_score_as_the_plain_path(how):
    """Eager attention takes the trees' mask as an additive float mask; the earlier code path scores context by
    context (bench.earlier): both equal the plain path."""
    from tiny_models import tiny_model

    lm = tiny_model("llama", seed=4)
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
