"""Accuracy and top-k accuracy: weighted share of examples whose label is the (top-k) prediction."""
import numpy as np

from ._registry import SliceData, ratio, register


def _correct(d: SliceData) -> np.ndarray:
    return np.stack([np.ones(len(d.labels)), d.labels == d.predictions], 1)


def _top_3(d: SliceData) -> np.ndarray:
    k = min(3, d.num_classes)
    p_true = d.probabilities[np.arange(len(d.labels)), d.labels]
    # rank of the true class = number of classes strictly more probable (scikit-learn counts it the same way)
    rank = (d.probabilities > p_true[:, None]).sum(1)
    return np.stack([np.ones(len(d.labels)), rank < k], 1)


@register("accuracy", higher_is_better=True, columns=_correct)
def accuracy(sums: np.ndarray, d: SliceData) -> np.ndarray:
    """Share of examples predicted correctly."""
    return ratio(sums[:, 1], sums[:, 0])


@register("top_3_accuracy", higher_is_better=True, columns=_top_3)
def top_3_accuracy(sums: np.ndarray, d: SliceData) -> np.ndarray:
    """Share of examples whose label is among the 3 most probable classes (a class tied with the label does
    not push it out, as TensorFlow's `in_top_k`; scikit-learn breaks such ties by class index)."""
    return ratio(sums[:, 1], sums[:, 0])
