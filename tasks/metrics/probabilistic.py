"""Log loss, Brier score and expected calibration error (15 equal-width confidence bins)."""
import numpy as np

from ._registry import SliceData, one_hot, register, weighted_mean

ECE_BINS = 15


@register("log_loss", higher_is_better=False, bounds=(0.0, float("inf")))
def log_loss(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Mean of -log p(label), p clipped to [eps, 1] (scikit-learn's `log_loss`)."""
    eps = np.finfo(d.probabilities.dtype).eps
    p = np.clip(d.probabilities[np.arange(len(d.labels)), d.labels], eps, 1.0)
    return weighted_mean(-np.log(p), W)


@register("brier", higher_is_better=False, bounds=(0.0, 2.0))
def brier(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Mean over examples of sum_k (p_k - 1[label = k])^2 (multi-class Brier score)."""
    err = ((d.probabilities - one_hot(d.labels, d.num_classes)) ** 2).sum(1)
    return weighted_mean(err, W)


def ece_bins(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Return the bin of each confidence: bin b holds (b / n, (b + 1) / n], bin 0 also holds 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


@register("ece", higher_is_better=False)
def ece(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Expected calibration error: sum_b (n_b / n) |accuracy_b - confidence_b| over 15 confidence bins
    (Guo et al. 2017, https://arxiv.org/abs/1706.04599)."""
    conf = d.probabilities.max(1)
    correct = (d.predictions == d.labels).astype(W.dtype)
    B = one_hot(ece_bins(conf), ECE_BINS, W.dtype)              # (n, bins)
    total = W.sum(1, keepdims=True, dtype=np.float64)
    gap = np.abs((W @ (B * correct[:, None])).astype(np.float64) - W @ (B * conf[:, None]).astype(W.dtype))
    return np.where(total[:, 0] > 0, gap.sum(1) / np.where(total[:, 0] > 0, total[:, 0], 1), np.nan)
