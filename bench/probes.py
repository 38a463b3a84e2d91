"""Per-head linear probes (scikit-learn logistic regression): ITI's head ranking and the released FLORAIN
code's layer-selection rule (layer score = mean validation accuracy of its heads' probes)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

#: How a probe is scored on the validation split. ``accuracy``: ITI's rule. ``auroc``: threshold-free, so it
#: still ranks heads when one class dominates (every probe then predicts the majority and accuracies tie).
PROBE_SCORES = ("accuracy", "auroc")


def head_probe_accuracies(train_acts: torch.Tensor, train_labels: torch.Tensor, val_acts: torch.Tensor,
                          val_labels: torch.Tensor, seed: int = 42, score: str = "accuracy") -> np.ndarray:
    """Validation score of one ``LogisticRegression(max_iter=1000)`` per head; ``*_acts: [n, H, D]`` → ``[H]``.

    ``score``: ``accuracy`` (ITI) or ``auroc`` (area under the ROC curve of the probe's decision function).
    """
    if score not in PROBE_SCORES:
        raise ValueError(f"unknown probe score {score!r}; valid: {', '.join(PROBE_SCORES)}")
    if len(val_acts) == 0:
        raise ValueError("probe accuracies need validation data")
    y_tr, y_va = train_labels.numpy(), val_labels.numpy()
    if score == "auroc" and len(np.unique(y_va)) < 2:
        raise ValueError("probe AUROC needs both classes among the validation examples; they hold only "
                         f"label {int(y_va[0])} (use more validation data or -O rank=accuracy)")
    scores = []
    for h in range(train_acts.shape[1]):
        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit(train_acts[:, h].numpy(), y_tr)
        x_va = val_acts[:, h].numpy()
        if score == "auroc":
            scores.append(float(roc_auc_score(y_va, clf.decision_function(x_va))))
        else:
            scores.append(float((clf.predict(x_va) == y_va).mean()))
    return np.asarray(scores)
