"""Accuracy and top-k accuracy: weighted share of examples whose label is the (top-k) prediction."""
import numpy as np

from ._registry import SliceData, register, weighted_mean


@register("accuracy", higher_is_better=True)
def accuracy(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Share of examples predicted correctly."""
    return weighted_mean((d.labels == d.predictions).astype(np.float64), W)


@register("top_3_accuracy", higher_is_better=True)
def top_3_accuracy(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Share of examples whose label is among the 3 most probable classes (ties broken by class order)."""
    k = min(3, d.num_classes)
    p_true = d.probabilities[np.arange(len(d.labels)), d.labels]
    # rank of the true class = number of classes strictly more probable (scikit-learn counts it the same way)
    rank = (d.probabilities > p_true[:, None]).sum(1)
    return weighted_mean((rank < k).astype(np.float64), W)
