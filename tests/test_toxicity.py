"""Toxicity benchmark pieces: metrics, sampling, prompt/steering data, scorers (embedded, perspective, profanity-check)."""

from __future__ import annotations

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from bench.runs import RunFolder
from bench.toxicity.base import ScorerNotAvailableError, get_scorer, score_samples, scorer_names
from bench.toxicity.metrics import (
    conditional_perplexity,
    count_empty,
    dist_n,
    distinctness,
    expected_max_toxicity,
    toxicity_probability,
)

# --------------------------------------------------------------------------- metrics


def test_dist_n_follows_dexperts_split_on_single_spaces():
    samples = [" a b a", " a b"]  # words: ['', a, b, a] and ['', a, b]: 7 in all
    assert dist_n(samples, 1) == pytest.approx(3 / 7)  # '', a, b
    assert dist_n(samples, 2) == pytest.approx(3 / 7)  # ('', a), (a, b), (b, a)
    assert dist_n(samples, 3) == pytest.approx(2 / 7)  # ('', a, b), (a, b, a); n-grams never cross samples
    assert dist_n(["x x x x"], 1) == dist_n(["x x x x"], 2) == dist_n(["x x x x"], 3) == pytest.approx(1 / 4)
    assert dist_n(["a  b"], 1) == pytest.approx(3 / 3)  # a double space yields an empty word
    summary = distinctness([samples, ["x x x x"]])
    assert summary["dist-1"]["mean"] == pytest.approx((3 / 7 + 1 / 4) / 2)
    assert summary["dist-3"]["n"] == 2
    with pytest.raises(ValueError):
        dist_n(samples, 0)


def test_expected_max_toxicity_and_toxicity_probability():
    scores = [[0.1, 0.6, 0.3], [0.2, 0.4], [0.5, 0.0]]  # maxima 0.6, 0.4, 0.5
    emt = expected_max_toxicity(scores)
    assert emt["mean"] == pytest.approx(0.5)
    assert emt["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert emt["n"] == 3
    prob = toxicity_probability(scores)  # >= 0.5: the third prompt counts
    assert prob["mean"] == pytest.approx(2 / 3)
    assert prob["se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert toxicity_probability(scores, threshold=0.55)["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="prompt 1"):
        expected_max_toxicity([[0.1], []])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma"])
def test_conditional_perplexity_matches_direct_computation(name, request):
    lm = request.getfixturevalue(name)
    tok, model = lm.tokenizer, lm.model
    long = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door and"
    prompts = ["Q: What is the capital", "I have", long, "Telescopes use lenses", "I have"]
    conts = [" of France?", " no comment.", " then the dog barks twice at the moon", " or mirrors to focus light", ""]
    res = conditional_perplexity(lm, prompts, conts, batch_size=3)
    assert res["n_no_tokens"] == 1 and res["values"][4] is None
    assert len(tok(long + conts[2])["input_ids"]) > 20  # longer than the tiny Gemma's sliding window (16)
    for prompt, cont, got in zip(prompts[:4], conts[:4], res["values"][:4]):
        p = tok(prompt, return_tensors="pt")["input_ids"]
        f = tok(prompt + cont, return_tensors="pt")["input_ids"]
        with torch.no_grad():  # DExperts: full loss − prompt loss, over the continuation's tokens
            full = model(f, labels=f).loss * (f.shape[1] - 1)
            part = model(p, labels=p).loss * (p.shape[1] - 1)
        assert got == pytest.approx(math.exp(((full - part) / (f.shape[1] - p.shape[1])).item()), rel=1e-4)
    assert res["summary"]["n"] == 4
    assert res["summary"]["mean"] == pytest.approx(sum(res["values"][:4]) / 4)
    one = conditional_perplexity(lm, prompts, conts, batch_size=1)
    assert one["values"][:4] == pytest.approx(res["values"][:4], rel=1e-4)
    dropped = conditional_perplexity(lm, prompts, conts, max_perplexity=1.0)
    assert dropped["n_dropped_high"] == 4 and dropped["summary"]["n"] == 0


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_independent_of_batching(tiny_llama):
    from bench.toxicity.sampling import sample_continuations

    prompts = ["Q: What is the capital", "Telescopes use lenses or", "I have"]
    kw = dict(n_samples=4, max_new_tokens=5, top_p=0.9, seed=7)
    seen: list[tuple[int, list[str]]] = []
    a = sample_continuations(tiny_llama, prompts, batch_size=5, on_prompt=lambda i, s: seen.append((i, s)), **kw)
    b = sample_continuations(tiny_llama, prompts, batch_size=12, **kw)
    alone = sample_continuations(tiny_llama, prompts[2:], batch_size=4, indices=[2], **kw)
    other = sample_continuations(tiny_llama, prompts, batch_size=12, **{**kw, "seed": 8})
    assert a == b
    assert alone[0] == a[2]  # resuming at prompt 2 gives its samples again
    assert other != a
    assert [len(s) for s in a] == [4, 4, 4]
    assert sorted(i for i, _ in seen) == [0, 1, 2] and dict(seen) == dict(enumerate(a))
    assert tiny_llama.tokenizer.padding_side == "right"

    from bench.interventions import Intervention

    class Shift(torch.nn.Module):
        def forward(self, acts: torch.Tensor) -> torch.Tensor:
            return acts + 3.0

    edited = sample_continuations(tiny_llama, prompts, batch_size=12,
                                  intervention=Intervention("shift", "heads", {1: Shift()}), **kw)
    assert edited != a
    assert sample_continuations(tiny_llama, prompts, batch_size=12, intervention=Intervention("none", "heads", {}),
                                **kw) == a  # no modules: no hooks; and the shift's hooks are gone


def test_sampler_stays_in_the_nucleus(tiny_llama):
    from transformers import TopPLogitsWarper

    from bench.toxicity.sampling import QuantileNucleusSampler

    ids = tiny_llama.tokenizer("I have", return_tensors="pt")["input_ids"]
    logits = tiny_llama.model(ids).logits[0, -1]
    probs = torch.softmax(TopPLogitsWarper(0.5)(ids, logits[None].clone())[0], -1)
    n = 500
    u = 1.0 - torch.rand(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = QuantileNucleusSampler(u, 0.5, ids.shape[1])(ids.repeat(n, 1), logits[None].repeat(n, 1))
    tokens = out.argmax(-1)
    assert torch.isinf(out).sum() == n * (out.shape[1] - 1)
    assert bool((probs[tokens] > 0).all())


#: Extra end-of-sequence ids for the tiny model (about 8% of its vocabulary), so that rows end early, at
#: different steps, and leave the continuous batch out of order.
EARLY_EOS = [2, *range(100, 130)]
DISTINCT_PROMPTS = ["Q: What is the capital", "Telescopes use lenses or", "I have", "The quick brown fox jumps over"]
SHARED_START = ["The garden said that", "The garden was", "The garden and the museum opened", "The garden"]


def _heads_shift(lm, scale: float, policy: str = "task"):
    """A seeded mean-shift of layer 1's heads (``policy``: the intervention's position policy)."""
    from baselines.shift import AdditiveShift
    from bench.interventions import Intervention

    heads, dim = lm.spec.site_shape("heads")
    shift = scale * torch.randn(heads, dim, generator=torch.Generator().manual_seed(1))
    return Intervention("mean-shift", "heads", {1: AdditiveShift(shift)}, {"heads": heads, "head_dim": dim},
                        position_policy=policy)


@pytest.mark.parametrize("prompts", [DISTINCT_PROMPTS, SHARED_START], ids=["distinct", "shared-start"])
@pytest.mark.parametrize("edit", [None, "task", "all"])
def test_cached_sampling_equals_the_generate_path(tiny_llama, monkeypatch: pytest.MonkeyPatch, prompts, edit):
    from bench.decoding import common_length
    from bench.toxicity.sampling import sample_continuations

    tok = tiny_llama.tokenizer
    assert (common_length([tok(p)["input_ids"] for p in prompts]) > 0) == (prompts is SHARED_START)
    iv = None if edit is None else _heads_shift(tiny_llama, 5.0, edit)
    kw = dict(n_samples=5, max_new_tokens=10, top_p=0.9, seed=11, batch_size=7, intervention=iv)
    full = sample_continuations(tiny_llama, prompts, **kw)
    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", EARLY_EOS)
    cached = sample_continuations(tiny_llama, prompts, **kw)
    plain = sample_continuations(tiny_llama, prompts, prefix_cache=False, **kw)
    assert cached == plain  # token-identical texts, row by row
    assert cached != full  # rows did end early at the extra EOS ids
    assert [len(s) for s in cached] == [5] * len(prompts)
    if iv is not None:
        assert cached != sample_continuations(tiny_llama, prompts, **{**kw, "intervention": None})
    assert tok.padding_side == "right"


def test_cached_samples_do_not_depend_on_batch_size_or_neighbours(tiny_llama, monkeypatch: pytest.MonkeyPatch):
    from bench.toxicity.sampling import sample_continuations

    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", EARLY_EOS)
    kw = dict(n_samples=6, max_new_tokens=10, top_p=0.9, seed=5)
    small = sample_continuations(tiny_llama, DISTINCT_PROMPTS, batch_size=3, **kw)
    large = sample_continuations(tiny_llama, DISTINCT_PROMPTS, batch_size=50, **kw)
    assert small == large
    mixed = sample_continuations(tiny_llama, [SHARED_START[0], DISTINCT_PROMPTS[2], SHARED_START[1]], batch_size=4,
                                 indices=[7, 2, 9], **kw)
    assert mixed[1] == small[2]  # prompt 2 decoded beside other prompts (a shared start no longer shared)
    alone = sample_continuations(tiny_llama, DISTINCT_PROMPTS[2:3], batch_size=5, indices=[2], **kw)
    assert alone[0] == small[2]  # alone, its whole prompt but the last token is the shared prefix


def test_on_prompt_is_called_once_per_prompt_as_its_samples_complete(tiny_llama, monkeypatch: pytest.MonkeyPatch):
    from bench.toxicity.sampling import sample_continuations

    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", EARLY_EOS)
    for prefix_cache in (True, False):
        seen: list[tuple[int, list[str]]] = []
        out = sample_continuations(tiny_llama, DISTINCT_PROMPTS, n_samples=4, max_new_tokens=10, seed=3,
                                   batch_size=3, indices=[10, 11, 12, 13], prefix_cache=prefix_cache,
                                   on_prompt=lambda i, s, seen=seen: seen.append((i, s)))
        assert sorted(i for i, _ in seen) == [10, 11, 12, 13]
        assert dict(seen) == {10 + p: samples for p, samples in enumerate(out)}
        assert all(len(s) == 4 for _, s in seen)
        assert seen[0][0] in (10, 11)  # the first prompts finish before the last ones are even prefilled


# --------------------------------------------------------------------------- data


def _write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_loading_and_malformed_line(tmp_path: Path):
    from bench.toxicity.data import load_toxicity_prompts

    good = [{"text": "The first prompt", "score": 0.2}, {"text": "The second prompt", "score": 0.7}]
    _write_jsonl(tmp_path / "toxicity" / "challenging_rtp.jsonl", good)
    prompts, source = load_toxicity_prompts(data_dir=tmp_path, use_hub=False)
    assert [p.id for p in prompts] == ["challenging:1", "challenging:2"]
    assert prompts[1].text == "The second prompt" and prompts[1].toxicity == 0.7
    assert source.endswith("challenging_rtp.jsonl")
    assert len(load_toxicity_prompts(data_dir=tmp_path, limit=1, use_hub=False)[0]) == 1
    _write_jsonl(tmp_path / "toxicity" / "challenging_rtp.jsonl", [*good, '{"text": "broken'])
    with pytest.raises(ValueError, match="line 3"):
        load_toxicity_prompts(data_dir=tmp_path, use_hub=False)
    _write_jsonl(tmp_path / "toxicity" / "challenging_rtp.jsonl", [good[0], {"score": 0.1}])
    with pytest.raises(ValueError, match="line 2: no prompt text"):
        load_toxicity_prompts(data_dir=tmp_path, use_hub=False)
    _write_jsonl(tmp_path / "toxicity" / "challenging_rtp.jsonl", [{"text": "x", "score": "high"}])
    with pytest.raises(ValueError, match="line 1: score"):
        load_toxicity_prompts(data_dir=tmp_path, use_hub=False)


TOXIC_WORDS = ["idiot", "stupid", "fucking", "moron", "shit", "damn loser", "disgusting pig", "dumb bastard"]
CLEAN_WORDS = ["garden", "weather", "concert", "library", "recipe", "holiday", "science", "museum"]


def _rtp(text: str, tox: float) -> dict:
    return {"filename": "x.txt", "begin": 0, "end": 1, "challenging": False, "prompt": {"text": text, "toxicity": tox}}


def write_toxicity_fixture(root: Path) -> Path:
    """A small data dir with the shared files' formats: 24 toxic and 24 clean prompts, 6 prompts with generations."""
    toxic = [_rtp(f"You are a {w} and a {TOXIC_WORDS[(i + 3) % 8]} number {i}", 0.6 + 0.05 * (i % 7))
             for i, w in enumerate(TOXIC_WORDS * 3)]
    clean = [_rtp(f"We talked about the {w} and the {CLEAN_WORDS[(i + 3) % 8]} number {i}", 0.02 + 0.05 * (i % 5))
             for i, w in enumerate(CLEAN_WORDS * 3)]
    gens = []
    for i in range(6):
        generations = [{"text": f" a {CLEAN_WORDS[(i + k) % 8]} visit", "toxicity": 0.05} for k in range(3)]
        generations += [{"text": f" you {TOXIC_WORDS[(i + k) % 8]}", "toxicity": 0.8} for k in range(2)]
        generations.append({"text": " unscored", "toxicity": None})
        gens.append({"prompt": {"text": f"Prompt number {i} says", "toxicity": 0.1},
                     "continuation": {"text": f" the {CLEAN_WORDS[i]} opens", "toxicity": 0.03},
                     "generations": generations})
    _write_jsonl(root / "toxicity" / "rtp_toxic_5k.jsonl", toxic)
    _write_jsonl(root / "toxicity" / "rtp_nontoxic_5k.jsonl", clean)
    _write_jsonl(root / "toxicity" / "prompted_gens_gpt2.jsonl", gens)
    return root


@pytest.fixture()
def tox_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    return write_toxicity_fixture(tmp_path / "data")


def test_steering_groups_and_exclusion(tox_data: Path):
    from bench.toxicity.data import exclude_prompts, load_steering_groups

    groups = load_steering_groups(tox_data)
    assert len(groups) == 6
    assert all(len(g.desirable) == 3 and len(g.undesirable) == 2 for g in groups)  # the unscored one is skipped
    kept = exclude_prompts(groups, ["Prompt number 0  says ", "something else"])
    assert [g.prompt for g in kept] == [f"Prompt number {i} says" for i in range(1, 6)]


# --------------------------------------------------------------------------- embedded scorer


def test_embedded_scorer_trains_saves_and_scores(tox_data: Path, tmp_path: Path):
    from bench.toxicity.data import load_scored_texts
    from bench.toxicity.embedded import default_dir, scorer_pool, split_heldout

    items, files = load_scored_texts(tox_data)
    assert len(items) == 48 + 6 * (5 + 1)
    train, val = split_heldout(items, seed=3)
    assert train and val and not {i.group for i in train} & {i.group for i in val}
    assert split_heldout(items, seed=3) == (train, val)
    pool = scorer_pool(items)

    with pytest.raises(ScorerNotAvailableError, match="bench toxicity train"):
        get_scorer("embedded", auto_train=False)
    scorer = get_scorer("embedded", data_dir=tox_data)  # trains automatically, into the tmp cache
    assert default_dir() == tmp_path / "cache" / "scorers" / "toxicity-embedded"
    meta = json.loads((default_dir() / "metadata.json").read_text())
    assert meta["files"]["toxic"]["sha256"] == files["toxic"]["sha256"]
    assert meta["n_texts"]["train"]["total"] + meta["n_texts"]["heldout_prompts"]["total"] == len(pool)
    assert {"auroc", "auroc_ci", "spearman", "spearman_ci", "n", "n_positive"} <= set(meta["validation"])
    s = scorer.score(["you are a stupid idiot", "a visit to the museum and the garden", ""])
    assert s[0] > s[1] and s[2] == 0.0 and all(0.0 <= v <= 1.0 for v in s)
    assert scorer.identity()["scorer"] == "embedded"
    assert scorer.identity()["validation"] == meta["validation"]
    again = get_scorer("embedded", auto_train=False)  # loads the saved model
    assert again.score(["you are a stupid idiot"]) == pytest.approx(s[:1])

    scored = score_samples(scorer, [["you moron", ""], ["", " ", "the garden"]], batch_size=2)
    assert scored.n_samples == 5 and scored.n_empty == 3
    assert [len(x) for x in scored.scores] == [2, 3] and scored.scores[1][:2] == [0.0, 0.0]
    assert count_empty([["you moron", ""], ["", " ", "the garden"]]) == 3


def test_toxicity_cli_train_and_validate(tox_data: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from bench.cli_toxicity import toxicity_app

    runner = CliRunner()
    res = runner.invoke(toxicity_app, ["train", "--data-dir", str(tox_data), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.output and "continuations" in res.output
    res = runner.invoke(toxicity_app, ["train", "--data-dir", str(tox_data), "--seed", "1"])
    assert res.exit_code == 0 and "up to date" in res.output
    out = tmp_path / "report.json"
    res = runner.invoke(toxicity_app, ["validate", "--data-dir", str(tox_data), "--seed", "1", "--resamples", "200",
                                       "--output", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["scorers"]) == {"embedded", "profanity-check"}
    assert report["bootstrap"]["resamples"] == 200 and set(report["sets"]) == {"continuations", "human", "heldout_prompts"}
    assert report["sets"]["continuations"] == {"description": "prompted_gens_gpt2 GPT-2 continuations", "n": 30,
                                               "n_positive": 12, "n_groups": 6}
    assert report["sets"]["human"]["n"] == 6 and report["sets"]["heldout_prompts"]["n"] > 0
    for entry in report["scorers"].values():
        assert set(entry["sets"]) == set(report["sets"])
        for name, r in entry["sets"].items():
            assert r["n"] == report["sets"][name]["n"] and len(r["reliability"]) == 10
            assert sum(b["n"] for b in r["reliability"]) == r["n"]
            if name == "human":  # the fixture's human continuations all score 0.03: neither AUROC nor Spearman
                assert r["auroc"] is r["auroc_ci"] is r["spearman"] is r["spearman_ci"] is None
                continue
            for key in ("auroc", "spearman"):
                lo, hi = r[f"{key}_ci"]
                assert lo <= r[key] <= hi
            assert 0 < r["resamples_used"] <= 200  # a resample of few prompts may lack one class
        task = entry["task_level"]
        assert task["n_prompts"] == 6 and task["n_texts"] == 30
        assert task["expected_max_toxicity"]["perspective"]["mean"] == pytest.approx(0.8)  # every prompt: max 0.8
        assert task["toxicity_probability"]["perspective"]["mean"] == 1.0
        lo, hi = task["expected_max_toxicity"]["difference_ci"]
        assert lo <= task["expected_max_toxicity"]["difference"] <= hi
    assert report["scorers"]["embedded"]["identity"]["validation"]["auroc"] == pytest.approx(
        report["scorers"]["embedded"]["sets"]["continuations"]["auroc"])
    res = runner.invoke(toxicity_app, ["validate", "--data-dir", str(tox_data), "--seed", "2"])
    assert res.exit_code == 2 and "seed 1" in res.output
    res = runner.invoke(toxicity_app, ["validate", "--data-dir", str(tox_data), "--scorer", "nope"])
    assert res.exit_code == 2 and "valid:" in res.output


def test_scorer_never_trains_on_prompted_gens_texts(tox_data: Path, tmp_path: Path):
    from bench.toxicity.data import load_scored_texts, rtp_part
    from bench.toxicity.embedded import scorer_split, train_embedded_scorer

    # an RTP record whose prompt is one of prompted_gens' prompts (and in the scorer part) must be left out too
    text = next(f"Prompt number {i} says" for i in range(6) if rtp_part(f"Prompt number {i} says") == "scorer")
    with (tox_data / "toxicity" / "rtp_nontoxic_5k.jsonl").open("a") as fh:
        fh.write(json.dumps(_rtp(text, 0.1)) + "\n")
    items, _ = load_scored_texts(tox_data)
    prompts = [it for it in items if it.source == "prompt"]
    train, heldout = scorer_split(items, seed=0)
    pool = train + heldout
    assert {it.source for it in pool} == {"prompt"} and all(rtp_part(it.text) == "scorer" for it in pool)
    assert not {it.text for it in pool} & {it.text for it in items if it.source != "prompt"}
    assert not {it.group for it in pool} & {it.group for it in items if it.source != "prompt"}
    assert len(pool) == sum(rtp_part(it.text) == "scorer" for it in prompts) - 1  # the prompted_gens prompt
    meta = train_embedded_scorer(tox_data, tmp_path / "model", seed=0, resamples=50)
    n = meta["n_texts"]
    assert n["train"]["total"] == n["train"]["prompt"] == len(train) and n["train"]["generation"] == n["train"]["human"] == 0
    assert n["pool"]["prompted_gens_prompts"] == 1 and n["pool"]["heldout_prompts"] == len(heldout)
    assert n["pool"]["steering_part"] == sum(rtp_part(it.text) == "steering" for it in prompts) > 0
    v = meta["validation"]
    assert set(v) == {"set", "auroc", "auroc_ci", "spearman", "spearman_ci", "n", "n_positive"}
    assert (v["n"], v["n_positive"]) == (30, 12) and "not in training" in v["set"]
    assert v["auroc_ci"][0] <= v["auroc"] <= v["auroc_ci"][1]


def test_group_bootstrap_resamples_whole_prompt_groups():
    from bench.toxicity.agreement import group_bootstrap, with_intervals

    scores, tox = [0.9, 0.8, 0.1, 0.2, 0.7, 0.3], [0.9, 0.6, 0.1, 0.4, 0.2, 0.1]
    r = with_intervals(scores, tox, ["a", "a", "b", "b", "c", "c"], resamples=300, seed=1)
    assert r == with_intervals(scores, tox, ["a", "a", "b", "b", "c", "c"], resamples=300, seed=1)
    assert r["n_groups"] == 3 and r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
    one = group_bootstrap(scores, tox, ["g"] * 6, resamples=20)  # one group: every resample is the whole set
    assert one["auroc_ci"] == pytest.approx([r["auroc"], r["auroc"]])
    assert one["spearman_ci"] == pytest.approx([r["spearman"], r["spearman"]])


def test_steering_texts_and_scorer_training_texts_are_disjoint(shared_data: Path):
    """Both steering sources against the embedded scorer's whole pool (training + held-out prompts), real data."""
    from bench.tasks.toxicity import STEER_SOURCES, steering_questions
    from bench.toxicity.data import load_scored_texts, normalise
    from bench.toxicity.embedded import scorer_split

    assert (shared_data / "toxicity" / "rtp_toxic_5k.jsonl").is_file(), "shared toxicity data missing"
    items, _ = load_scored_texts(shared_data)
    train, heldout = scorer_split(items, seed=0)
    assert len(train) > 6000 and len(heldout) > 1500
    scorer_texts = {normalise(it.text) for it in train + heldout}
    for source in STEER_SOURCES:
        groups = steering_questions(source, [], shared_data, seed=0)  # nothing excluded: every text a fit may see
        steer = {normalise(t) for q in groups for t in (q.question, *q.correct, *q.incorrect) if t.strip()}
        assert len(steer) > 1500, source  # gpt2-gens: 100 prompts + ~2,500 continuations; rtp: ~19 groups of 100
        shared = steer & scorer_texts
        assert not shared, f"--steer-data {source}: {len(shared)} texts also train the scorer, e.g. {sorted(shared)[:3]}"


def _synthetic_toxicity_run(run: Path) -> tuple[list[list[str]], dict]:
    """A finished one-fold toxicity run as the runner writes it: samples, per-question records, results, fold file."""
    from bench.report import results_table

    samples = [["you stupid idiot", "a calm day"], ["the garden opens", ""], ["fuck you moron", "fine weather"]]
    old = [[0.2, 0.1], [0.3, 0.0], [0.4, 0.2]]
    records = [{"index": i, "id": f"p:{i}", "max_toxicity": max(s), "scores": s, "mean_ppl": 10.0 + i}
               for i, s in enumerate(old)]
    metrics = {"expected_max_toxicity": expected_max_toxicity(old), "toxicity_probability": toxicity_probability(old),
               "fluency_ppl": {"mean": 12.5, "se": 1.5, "n": 5}, "dist-1": {"mean": 0.7, "se": 0.1, "n": 3}}
    results = {"config": {"model": "tiny", "method": "none", "task": "toxicity", "layer": None,
                          "scorer": "profanity-check", "scorer_options": {}},
               "scorer": {"scorer": "old-scorer", "version": 1, "fluency_model": "ref-lm"}, "metrics": metrics,
               "folds": [{"fold": 0, "layer": None, "metrics": json.loads(json.dumps(metrics))}]}
    _write_jsonl(run / "samples_fold0.jsonl", [{"index": i, "id": f"p:{i}", "prompt": f"P{i}", "samples": s}
                                               for i, s in enumerate(samples)])
    _write_jsonl(run / "per_question.jsonl", [{"fold": 0, **r} for r in records])
    (run / "results.json").write_text(json.dumps(results))
    (run / "results.md").write_text(results_table([results], tuple(metrics)) + "\n")
    (run / "fold_0.toxicity.json").write_text(json.dumps({"metrics": metrics, "records": records}))
    return samples, results


def test_rescore_replaces_toxicity_numbers_and_keeps_the_rest(tmp_path: Path):
    from typer.testing import CliRunner

    from bench.cli_toxicity import toxicity_app

    run = tmp_path / "run"
    samples, before = _synthetic_toxicity_run(run)
    res = CliRunner().invoke(toxicity_app, ["rescore", str(run)])
    assert res.exit_code == 0, res.output
    scorer = get_scorer("profanity-check")
    new = [scorer.score(s) for s in samples]
    after = json.loads((run / "results.json").read_text())
    emt = expected_max_toxicity(new)
    assert after["metrics"]["expected_max_toxicity"]["mean"] == pytest.approx(emt["mean"])
    assert after["metrics"]["toxicity_probability"]["mean"] == pytest.approx(toxicity_probability(new)["mean"])
    assert after["folds"][0]["metrics"]["expected_max_toxicity"]["mean"] == pytest.approx(emt["mean"])
    for m in ("fluency_ppl", "dist-1"):
        assert after["metrics"][m] == before["metrics"][m] and after["folds"][0]["metrics"][m] == before["metrics"][m]
    assert after["scorer"] == {**scorer.identity(), "fluency_model": "ref-lm"}
    entry = after["rescored"][-1]
    assert entry["previous_scorer"] == before["scorer"] and {"date", "git"} <= set(entry)
    assert entry["previous_metrics"]["expected_max_toxicity"] == before["metrics"]["expected_max_toxicity"]
    per_q = RunFolder(run).read_per_question()
    assert [v for r in per_q for v in r["scores"]] == pytest.approx([v for s in new for v in s])
    assert [r["mean_ppl"] for r in per_q] == [10.0, 11.0, 12.0]
    assert [r["max_toxicity"] for r in per_q] == pytest.approx([max(s) for s in new]) and per_q[1]["scores"][1] == 0.0
    assert f"{emt['mean']:.3f} ± {emt['se']:.3f}" in (run / "results.md").read_text()
    fold_file = json.loads((run / "fold_0.toxicity.json").read_text())
    assert [v for r in fold_file["records"] for v in r["scores"]] == pytest.approx([v for s in new for v in s])
    assert not list(run.glob(".*"))  # no temp file left behind

    (run / "samples_fold0.jsonl").write_text(json.dumps({"index": 0, "samples": samples[0]}) + "\n")
    res = CliRunner().invoke(toxicity_app, ["rescore", str(run)])
    assert res.exit_code == 2 and "lacks the samples of 2 prompts" in " ".join(res.output.split())


# --------------------------------------------------------------------------- other scorers


def test_get_scorer_errors(monkeypatch: pytest.MonkeyPatch):
    assert {"embedded", "detoxify", "perspective", "profanity-check"} <= set(scorer_names())
    with pytest.raises(ValueError, match="valid: .*embedded"):
        get_scorer("toxic-bert")
    with pytest.raises(ValueError, match="unknown option"):
        get_scorer("profanity-check", threshold=0.3)
    monkeypatch.setitem(sys.modules, "detoxify", None)  # as if not installed
    with pytest.raises(ScorerNotAvailableError, match="pip install detoxify"):
        get_scorer("detoxify")


def test_profanity_check_runs_offline():
    scorer = get_scorer("profanity-check")
    s = scorer.score(["fuck you, you stupid shit", "have a lovely day at the park", ""])
    assert s[0] > 0.5 > s[1] and s[2] == 0.0
    assert scorer.identity()["package"] == "alt-profanity-check"


KEY = "perspective-test-key"


class FakePerspective:
    """Scripted loopback server: queued (status, body) answers first, then a score derived from the text."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.url = ""


@pytest.fixture()
def perspective():
    state = FakePerspective()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with state.lock:
                state.requests.append((self.path, payload))
                status, body = state.script.pop(0) if state.script else (200, "")
            if status == 200 and not body:
                value = 0.9 if "idiot" in payload["comment"]["text"] else 0.1
                body = json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": value,
                                                                                     "type": "PROBABILITY"}}}})
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1alpha1/comments:analyze"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_perspective_scorer_against_loopback_server(perspective, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    opts = dict(base_url=perspective.url, qps=0, backoff=0.01, cache_root=tmp_path / "pcache")
    with pytest.raises(ScorerNotAvailableError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective", **opts)
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)

    scorer = get_scorer("perspective", **opts)
    assert scorer.score(["you idiot", ""]) == [0.9, 0.0]  # the empty text makes no request
    path, payload = perspective.requests[0]
    assert f"key={KEY}" in path and payload["comment"]["text"] == "you idiot"
    assert payload["requestedAttributes"] == {"TOXICITY": {}} and payload["languages"] == ["en"]

    perspective.script.append((429, '{"error": {"code": 429}}'))
    assert scorer.score(["a calm sentence"]) == [0.1]
    assert len(perspective.requests) == 3  # 1 + (429, then success)

    fresh = get_scorer("perspective", **opts)
    assert fresh.score(["you idiot", "a calm sentence"]) == [0.9, 0.1]
    assert fresh.n_requests == 0 and len(perspective.requests) == 3  # served from the disk cache
    cached = list((tmp_path / "pcache").rglob("*.json"))
    assert len(cached) == 2 and all(KEY not in p.read_text() for p in cached)

    from bench.toxicity.perspective import PerspectiveError

    perspective.script.append((400, '{"error": {"message": "LANGUAGE_NOT_SUPPORTED"}}'))
    with pytest.raises(PerspectiveError, match="HTTP 400") as err:
        scorer.score(["texte en français"])
    assert KEY not in str(err.value)
    perspective.script.extend([(503, "{}")] * 3)
    with pytest.raises(PerspectiveError, match="after 3 attempts"):
        get_scorer("perspective", **{**opts, "max_retries": 2}).score(["never scored"])


# --------------------------------------------------------------------------- shared data


def test_shared_toxicity_data(shared_data: Path):
    from bench.toxicity.data import exclude_prompts, load_steering_groups, load_toxicity_prompts

    assert (shared_data / "toxicity" / "challenging_rtp.jsonl").is_file(), "shared toxicity data missing"
    prompts, _ = load_toxicity_prompts("challenging", shared_data, use_hub=False)
    assert len(prompts) == 1196 and all(p.text for p in prompts)
    groups = load_steering_groups(shared_data)
    assert len(groups) == 100
    assert sum(len(g.undesirable) for g in groups) == 31
    assert sum(len(g.desirable) + len(g.undesirable) for g in groups) == 2497
    assert len(exclude_prompts(groups, [groups[0].prompt])) == 99


def test_toxicity_task_runs_end_to_end_and_resumes_to_the_same_numbers(tox_data: Path, tiny_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    import inspect
    import json as _json

    from typer.testing import CliRunner

    import bench.tasks.toxicity as task
    from bench.cli import app

    prompts = _write_jsonl(tox_data / "eval.jsonl", [{"text": f"The {w} said", "score": 0.3} for w in CLEAN_WORDS[:4]])
    common = ["run", "--model", str(tiny_dir), "--data-dir", str(tox_data), "--task", "toxicity", "--tox-prompts",
              str(prompts), "--samples", "2", "--max-new-tokens", "4", "--fluency-model", str(tiny_dir),
              "--sample-batch-size", "3"]
    runner = CliRunner()
    out = tmp_path / "none"
    r = runner.invoke(app, [*common, "--method", "none", "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = _json.loads((out / "results.json").read_text())
    assert {"expected_max_toxicity", "toxicity_probability", "fluency_ppl", "dist-1", "dist-2", "dist-3"} <= set(res["metrics"])
    assert res["metrics"]["expected_max_toxicity"]["n"] == 4 and res["scorer"]["scorer"] == "embedded"
    assert res["data"]["counts"]["samples"] == 8 and res["config"]["max_new_tokens"] == 4
    stages = res["folds"][0]["timings"]["toxicity_stages"]
    assert stages["sampled_prompts"] == 4 and all(stages[k] > 0 for k in ("sampling_s", "fluency_s"))
    lines = (out / "samples_fold0.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for f in ("results.json", "fold_0.json", "fold_0.toxicity.json"):
        (out / f).unlink()
    (out / "samples_fold0.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])
    r = runner.invoke(app, [*common, "--method", "none", "--output", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert "reusing the samples of 2 prompts" in " ".join(r.output.split())
    assert _json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
    steered = tmp_path / "fl"
    batches, perplexity = [], task.conditional_perplexity

    def recorded(*a, **k):
        batches.append(inspect.signature(perplexity).bind(*a, **k).arguments["batch_size"])
        return perplexity(*a, **k)

    monkeypatch.setattr(task, "conditional_perplexity", recorded)
    r = runner.invoke(app, [*common, "--method", "mean-shift", "--layer", "1", "-O", "scale=50",
                            "--score-batch-size", "1", "--output", str(steered)])
    assert r.exit_code == 0, r.output
    assert batches == [1]  # the fluency scorer's batch is --score-batch-size
    assert (steered / "samples_fold0.jsonl").read_text() != (out / "samples_fold0.jsonl").read_text()
    r = runner.invoke(app, [*common, "--method", "lofit", "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "takes: none, florain" in " ".join(r.output.split())


# --------------------------------------------------------------------------- tuning on validation prompts


def test_validation_prompts_are_the_last_n_and_never_the_test_prompts(tox_data: Path):
    from bench.tasks.toxicity import evaluation_prompts

    path = _write_jsonl(tox_data / "ten.jsonl", [{"text": f"Prompt {i} goes", "score": 0.1} for i in range(10)])
    test, avoid, _ = evaluation_prompts(str(path), tox_data, 3, "test")
    assert [p.text for p in test] == ["Prompt 0 goes", "Prompt 1 goes", "Prompt 2 goes"] and avoid == test
    val, avoid, _ = evaluation_prompts(str(path), tox_data, 3, "val")
    assert [p.text for p in val] == ["Prompt 7 goes", "Prompt 8 goes", "Prompt 9 goes"]
    assert {p.text for p in avoid} == {p.text for p in test + val}  # fitting texts avoid both sets
    for limit in (None, 6):
        with pytest.raises(ValueError, match="N ≤ 5"):
            evaluation_prompts(str(path), tox_data, limit, "val")


def test_strength_sweep_on_validation_prompts_respects_the_fluency_limit(tox_data: Path, tiny_dir: Path,
                                                                        tmp_path: Path):
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.sweep import choose

    prompts = _write_jsonl(tox_data / "eval.jsonl", [{"text": f"The {w} said", "score": 0.3} for w in CLEAN_WORDS])
    common = ["sweep", "--method", "mean-shift", "--param", "scale", "--model", str(tiny_dir), "--task", "toxicity",
              "--layer", "1", "--limit", "3", "--tox-prompts", str(prompts), "--samples", "2", "--max-new-tokens", "4",
              "--fluency-model", str(tiny_dir), "--sample-batch-size", "4", "--data-dir", str(tox_data),
              "--metric", "expected_max_toxicity", "--no-plot"]
    runner = CliRunner()
    r = runner.invoke(app, [*common[:5], "--values", "1", "--max-fluency-ratio", "2", "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs generated text to read" in " ".join(r.output.split())
    out = tmp_path / "sweep"
    # ratio 1: only strengths that leave fluency at or below the unintervened model's are admissible
    r = runner.invoke(app, [*common, "--values", "0,500", "--max-fluency-ratio", "1", "--output", str(out)])
    assert r.exit_code == 0, r.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["folds"] == 1 and sweep["max_fluency_ratio"] == 1.0
    val = [json.loads((out / f"scale={v}" / "results.json").read_text()) for v in ("0", "500")]
    assert all(r["data"]["n_prompts"] == 3 and r["config"]["eval_split"] == "val" for r in val)
    assert (out / "scale=0" / "samples_fold0.jsonl").read_text().count("The museum said") == 1  # last 3 prompts
    base_ppl = sweep["baseline"]["metrics"]["fluency_ppl"]["mean"]
    assert val[0]["metrics"]["fluency_ppl"]["mean"] == base_ppl  # scale 0 is the unintervened model
    assert val[1]["metrics"]["fluency_ppl"]["mean"] > base_ppl  # the fixture's strong shift hurts fluency
    assert sweep["chosen"]["per_fold"] == {"0": 0.0}
    if val[1]["metrics"]["expected_max_toxicity"]["mean"] < val[0]["metrics"]["expected_max_toxicity"]["mean"]:
        assert choose(sweep["points"], "expected_max_toxicity")["per_fold"] == {"0": 500.0}  # unconstrained
    final = json.loads((out / "final" / "results.json").read_text())
    assert final["config"]["eval_split"] == "test"
    assert "The garden said" in (out / "final" / "samples_fold0.jsonl").read_text()  # first 3 prompts
