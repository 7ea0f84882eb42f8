"""Log loss, Brier score and expected calibration error (15 equal-width confidence bins)."""
import numpy as np

from ._registry import SliceData, one_hot, ratio, register

ECE_BINS = 15


def _nll(d: SliceData) -> np.ndarray:
    eps = np.finfo(d.probabilities.dtype).eps
    p = np.clip(d.probabilities[np.arange(len(d.labels)), d.labels], eps, 1.0)
    return np.stack([np.ones(len(p)), -np.log(p)], 1)


def _squared_error(d: SliceData) -> np.ndarray:
    err = ((d.probabilities - one_hot(d.labels, d.num_classes)) ** 2).sum(1)
    return np.stack([np.ones(len(err)), err], 1)


@register("log_loss", higher_is_better=False, bounds=(0.0, float("inf")), columns=_nll)
def log_loss(sums: np.ndarray, d: SliceData) -> np.ndarray:
    """Mean of -log p(label), p clipped to [eps, 1] (scikit-learn's `log_loss`)."""
    return ratio(sums[:, 1], sums[:, 0])


@register("brier", higher_is_better=False, bounds=(0.0, 2.0), columns=_squared_error)
def brier(sums: np.ndarray, d: SliceData) -> np.ndarray:
    """Mean over examples of sum_k (p_k - 1[label = k])^2 (multi-class Brier score)."""
    return ratio(sums[:, 1], sums[:, 0])


def ece_bins(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Return the bin of each confidence: bin b holds (b / n, (b + 1) / n], bin 0 also holds 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


def _calibration(d: SliceData) -> np.ndarray:
    """Per example: [1 | correct in its confidence bin (15) | confidence in its bin (15)]."""
    conf = d.probabilities.max(1)
    B = one_hot(ece_bins(conf), ECE_BINS)
    correct = (d.predictions == d.labels).astype(np.float64)
    return np.concatenate([np.ones((len(conf), 1)), B * correct[:, None], B * conf[:, None]], 1)


@register("ece", higher_is_better=False, columns=_calibration)
def ece(sums: np.ndarray, d: SliceData) -> np.ndarray:
    """Expected calibration error: sum_b (n_b / n) |accuracy_b - confidence_b| over 15 confidence bins
    (Guo et al. 2017, https://arxiv.org/abs/1706.04599)."""
    sums = sums.astype(np.float64)
    gap = np.abs(sums[:, 1:1 + ECE_BINS] - sums[:, 1 + ECE_BINS:]).sum(1)
    return ratio(gap, sums[:, 0])
