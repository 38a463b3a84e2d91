import torch

from bench.probes import head_probe_accuracies


def test_probe_separates_an_informative_head_only():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    acts = torch.randn(400, 2, 5, generator=g)
    acts[:, 0, 0] += 4 * (labels.float() - 0.5)  # head 0 carries the label, head 1 is noise
    acc = head_probe_accuracies(acts[:300], labels[:300], acts[300:], labels[300:])
    assert acc[0] > 0.9 and acc[1] < 0.7
