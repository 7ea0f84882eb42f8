"""Per-class and macro precision, recall and F1 from weighted confusion counts (scikit-learn's definitions,
zero_division=0; the macro average is over classes present in labels or predictions)."""
import numpy as np

from ._registry import SliceData, one_hot, ratio, register


def _counts(d: SliceData, W: np.ndarray):
    k = d.num_classes
    yt, yp = one_hot(d.labels, k, W.dtype), one_hot(d.predictions, k, W.dtype)
    tp = W @ (yt * yp)
    return tp, W @ yp, W @ yt          # (R, K) each: true positives, predicted, actual


def _per_class(kind: str, d: SliceData, W: np.ndarray) -> np.ndarray:
    tp, pred, actual = _counts(d, W)
    if kind == "precision":
        return ratio(tp, pred, empty=0.0)
    if kind == "recall":
        return ratio(tp, actual, empty=0.0)
    return ratio(2 * tp, pred + actual, empty=0.0)


def _macro(kind: str, d: SliceData, W: np.ndarray) -> np.ndarray:
    return _per_class(kind, d, W)[:, d.classes_present()].mean(1)


@register("precision", higher_is_better=True, per_class=True)
def precision(d, W):
    """Per class: TP / predicted."""
    return _per_class("precision", d, W)


@register("recall", higher_is_better=True, per_class=True)
def recall(d, W):
    """Per class: TP / actual."""
    return _per_class("recall", d, W)


@register("f1", higher_is_better=True, per_class=True)
def f1(d, W):
    """Per class: 2 TP / (predicted + actual)."""
    return _per_class("f1", d, W)


@register("precision_macro", higher_is_better=True)
def precision_macro(d, W):
    """Unweighted mean of per-class precision."""
    return _macro("precision", d, W)


@register("recall_macro", higher_is_better=True)
def recall_macro(d, W):
    """Unweighted mean of per-class recall (balanced accuracy)."""
    return _macro("recall", d, W)


@register("f1_macro", higher_is_better=True)
def f1_macro(d, W):
    """Unweighted mean of per-class F1."""
    return _macro("f1", d, W)
