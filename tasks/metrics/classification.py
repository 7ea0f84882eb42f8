"""Per-class and macro precision, recall and F1 from weighted confusion counts (scikit-learn's definitions,
zero_division=0; the macro average is over classes present in labels or predictions).

A macro average compares classes, so a slice needs at least two classes among its labels for one: in a
slice of one true class ('label_name=astronaut'), scikit-learn's average is over that class and any class
only predicted, whose F1 is 0 by definition, so `f1_macro` there is about half the class's F1 and moves with
how many wrong classes were predicted, not with how good the model is. Such a slice gets no macro value
(null, shown as '–'); its per-class and accuracy rows say what there is to say (docs/correctness.md)."""
import numpy as np

from ._registry import SliceData, one_hot, ratio, register


def _counts(d: SliceData) -> np.ndarray:
    """Per example: [true positive (K) | predicted (K) | actual (K)] indicators; shared by all six metrics."""
    k = d.num_classes
    yt, yp = one_hot(d.labels, k), one_hot(d.predictions, k)
    return np.concatenate([yt * yp, yp, yt], 1)


def _per_class(kind: str, sums: np.ndarray, d: SliceData) -> np.ndarray:
    k = d.num_classes
    tp, pred, actual = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
    if kind == "precision":
        return ratio(tp, pred, empty=0.0)
    if kind == "recall":
        return ratio(tp, actual, empty=0.0)
    return ratio(2 * tp, pred + actual, empty=0.0)


def _macro(kind: str, sums: np.ndarray, d: SliceData) -> np.ndarray:
    if len(np.unique(d.labels)) < 2:
        return np.full(len(sums), np.nan)
    return _per_class(kind, sums, d)[:, d.classes_present()].mean(1)


@register("precision", higher_is_better=True, per_class=True, columns=_counts)
def precision(sums, d):
    """Per class: TP / predicted."""
    return _per_class("precision", sums, d)


@register("recall", higher_is_better=True, per_class=True, columns=_counts)
def recall(sums, d):
    """Per class: TP / actual."""
    return _per_class("recall", sums, d)


@register("f1", higher_is_better=True, per_class=True, columns=_counts)
def f1(sums, d):
    """Per class: 2 TP / (predicted + actual)."""
    return _per_class("f1", sums, d)


@register("precision_macro", higher_is_better=True, columns=_counts)
def precision_macro(sums, d):
    """Unweighted mean of per-class precision."""
    return _macro("precision", sums, d)


@register("recall_macro", higher_is_better=True, columns=_counts)
def recall_macro(sums, d):
    """Unweighted mean of per-class recall (balanced accuracy)."""
    return _macro("recall", sums, d)


@register("f1_macro", higher_is_better=True, columns=_counts)
def f1_macro(sums, d):
    """Unweighted mean of per-class F1."""
    return _macro("f1", sums, d)
