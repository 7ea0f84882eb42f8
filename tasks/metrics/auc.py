"""One-vs-rest ROC AUC, macro-averaged over the classes that have both positives and negatives.

Weighted Mann-Whitney statistic with ties counted one half, for all replicates at once."""
import numpy as np

from ._registry import SliceData, register


def weighted_auc(scores: np.ndarray, positive: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Return the ROC AUC of `scores` for the `positive` mask under each replicate's weights (R,)."""
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    Ws = W[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])       # groups of tied scores
    wp = np.add.reduceat(Ws * pos, starts, axis=1)
    wn = np.add.reduceat(Ws * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(1)
    den = wp.sum(1) * wn.sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


@register("auc_ovr_macro", higher_is_better=True)
def auc_ovr_macro(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Mean over classes of the one-vs-rest ROC AUC of p(class) (scikit-learn's `roc_auc_score`,
    multi_class='ovr', average='macro'), over classes with positives and negatives in the slice."""
    values = []
    for k in range(d.num_classes):
        positive = d.labels == k
        if positive.all() or not positive.any():
            continue
        values.append(weighted_auc(d.probabilities[:, k], positive, W))
    if not values:
        return np.full(W.shape[0], np.nan)
    return np.nanmean(np.stack(values, 1), axis=1) if len(values) > 1 else values[0]
