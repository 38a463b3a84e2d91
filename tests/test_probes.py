import numpy as np
import pytest
import torch

from bench.probes import head_probe_accuracies


def test_probe_separates_an_informative_head_only():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    acts = torch.randn(400, 2, 5, generator=g)
    acts[:, 0, 0] += 4 * (labels.float() - 0.5)  # head 0 carries the label, head 1 is noise
    acc = head_probe_accuracies(acts[:300], labels[:300], acts[300:], labels[300:])
    assert acc[0] > 0.9 and acc[1] < 0.7


def test_auroc_ranks_heads_where_class_imbalance_ties_the_accuracies():
    """With 1 positive in 50, every probe predicts the majority: accuracies tie; AUROC still finds the head."""
    g = torch.Generator().manual_seed(1)
    n = 1000
    labels = (torch.rand(n, generator=g) < 0.02).long()
    acts = torch.randn(n, 3, 4, generator=g)
    acts[:, 2, 0] += 1.5 * labels.float()  # only head 2 carries the (rare) label, weakly
    tr, va = slice(0, 700), slice(700, n)
    acc = head_probe_accuracies(acts[tr], labels[tr], acts[va], labels[va])
    auc = head_probe_accuracies(acts[tr], labels[tr], acts[va], labels[va], score="auroc")
    majority = float((labels[va] == 0).float().mean())
    assert np.all(np.abs(acc - majority) <= 0.01)  # every probe ≈ the majority rate: no ranking information
    assert int(np.argmax(acc)) != 2  # accuracy would not pick the informative head
    assert int(np.argmax(auc)) == 2 and auc[2] > 0.8 and max(auc[0], auc[1]) < 0.7


def test_probe_score_errors_say_what_is_valid():
    acts, labels = torch.randn(20, 2, 3), torch.tensor([0, 1] * 10)
    with pytest.raises(ValueError, match="valid: accuracy, auroc"):
        head_probe_accuracies(acts, labels, acts, labels, score="f1")
    with pytest.raises(ValueError, match="both classes"):
        head_probe_accuracies(acts, labels, acts[:3:2], labels[:3:2], score="auroc")
