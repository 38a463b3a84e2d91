"""Per-head linear probes (scikit-learn logistic regression): ITI's head ranking and the released FLORAIN
code's layer-selection rule (layer score = mean validation accuracy of its heads' probes)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression


def head_probe_accuracies(train_acts: torch.Tensor, train_labels: torch.Tensor, val_acts: torch.Tensor,
                          val_labels: torch.Tensor, seed: int = 42) -> np.ndarray:
    """Validation accuracy of one ``LogisticRegression(max_iter=1000)`` per head; ``*_acts: [n, H, D]`` → ``[H]``."""
    if len(val_acts) == 0:
        raise ValueError("probe accuracies need validation data")
    y_tr, y_va = train_labels.numpy(), val_labels.numpy()
    accs = []
    for h in range(train_acts.shape[1]):
        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit(train_acts[:, h].numpy(), y_tr)
        accs.append(float((clf.predict(val_acts[:, h].numpy()) == y_va).mean()))
    return np.asarray(accs)
