"""Human labels, the embedded judge and judge validation on small fixtures the tests write themselves."""

import json

import numpy as np
import pytest

from bench.judges import JudgeItem, get_judge, judge_names
from bench.judges.embedded import Example, dedup_labels
from bench.judges.labels import load_labels
from bench.judges.validate import agreement, splits


def test_labels_parse_and_malformed_lines_name_their_line(tqa_dir, tmp_path):
    labels = load_labels("truth", tqa_dir)
    assert labels[0].question == "What is fact 0?" and labels[0].answer == "Fact 0 is true." and labels[0].label
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "Q: a?\nA: b.\nTrue:", "completion": " yes"})
    bad.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3"):
        load_labels("truth", path=bad)
    bad.write_text(json.dumps({"prompt": "Q: a?\nA: b.\nTrue:", "completion": " maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: completion must be ' yes' or ' no'"):
        load_labels("truth", path=bad)
    with pytest.raises(ValueError, match="valid: truth, info"):
        load_labels("honesty", tqa_dir)


def test_duplicates_are_merged_and_conflicts_dropped(tmp_path):
    d = tmp_path / "truthfulqa"
    d.mkdir()
    rows = [("a?", "x.", " yes"), ("a?", "x.", " yes"), ("a?", "y.", " yes"), ("a?", "y.", " no"), ("b?", "z.", " no")]
    (d / "finetune_truth.jsonl").write_text("".join(
        json.dumps({"prompt": f"Q: {q}\nA: {a}\nTrue:", "completion": c}) + "\n" for q, a, c in rows))
    examples, stats = dedup_labels("truth", tmp_path)
    assert stats == {"rows": 5, "unique_pairs": 3, "conflicting_pairs_dropped": 1}
    assert sorted((e.question, e.answer, e.label) for e in examples) == [("a?", "x.", True), ("b?", "z.", False)]


def test_question_grouped_split_never_shares_a_question():
    examples = [Example(f"q{i % 7}", f"a{i}", bool(i % 2)) for i in range(70)]
    for tr, te in splits(examples, "new-questions", 5, 0):
        assert not {examples[i].question for i in tr} & {examples[i].question for i in te}
    dep = list(splits(examples, "deployment", 5, 0))
    assert any({examples[i].question for i in tr} & {examples[i].question for i in te} for tr, te in dep)
    with pytest.raises(ValueError, match="valid: deployment, new-questions"):
        list(splits(examples, "random", 5, 0))


def test_agreement_counts():
    r = agreement([True, True, False, False], [0.9, 0.2, 0.6, 0.1])
    assert r["accuracy"] == 0.5 and r["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert r["balanced_accuracy"] == 0.5


def test_embedded_judge_trains_caches_and_judges(tqa_dir, judge_cache):
    assert {"embedded", "openai", "hf"} <= set(judge_names())
    judge = get_judge("embedded", data_dir=tqa_dir)
    meta = judge.identity()
    assert meta["backend"] == "embedded" and meta["trained_on"]["truth"]["unique_pairs"] == 96
    assert str(judge_cache) in meta["path"]
    items = [JudgeItem("What is fact 3?", "Fact 3 is true."), JudgeItem("What is fact 3?", "Fact 3 is false."),
             JudgeItem("What is fact 3?", "I have no comment."), JudgeItem("What is fact 3?", "")]
    v = judge.judge(items)
    assert all(0.0 <= x.p_true <= 1.0 and 0.0 <= x.p_info <= 1.0 for x in v)
    assert v[0].true and not v[1].true and v[2].true and not v[2].info  # seen answers: the labels are learnt
    again = get_judge("embedded", data_dir=tqa_dir, train_if_missing=False)  # loads the cache, no retraining
    np.testing.assert_allclose([x.p_true for x in again.judge(items)], [x.p_true for x in v])


def test_missing_embedded_judge_without_training_says_how_to_train(judge_cache):
    with pytest.raises(FileNotFoundError, match="bench judge train"):
        get_judge("embedded", train_if_missing=False)
    with pytest.raises(ValueError, match="valid: embedded, hf, openai"):
        get_judge("gpt-judge")
