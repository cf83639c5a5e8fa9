"""Classification metrics from a confusion matrix (design.md §4): accuracy alone misleads on
imbalanced data (16 health-tweet outlets, a spam filter), so every evaluation also reports macro-F1.

One convention throughout: `confusion[t, p]` counts examples of true class t predicted as p (rows
true, columns predicted). Per-batch matrices add up exactly (integer counts), so a split scored in
pieces, in workers or here, gives the same numbers.

Macro-F1 averages the per-class F1 over the classes that occur in the true labels or in the
predictions (scikit-learn's default label set for `f1_score(average="macro")`): a class absent from
both says nothing about the model and would count as a free 0 or 1. A class that occurs but is
never predicted correctly counts 0.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "macro_f1")  # the names `run.metric` takes


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts, rows = true class, columns = predicted class."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    # cell (t, p) is bin t·K + p
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(confusion: np.ndarray) -> float:
    """Share of examples on the diagonal: trace(C) / ΣC."""
    c = np.asarray(confusion)
    return int(np.trace(c)) / int(c.sum())


def macro_f1(confusion: np.ndarray) -> float:
    """Mean over present classes of F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c) (module docstring)."""
    c = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(c)
    fp = c.sum(0) - tp  # predicted c, truly another class
    fn = c.sum(1) - tp  # truly c, predicted another class
    present = (c.sum(0) + c.sum(1)) > 0
    if not present.any():
        return 0.0
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())
