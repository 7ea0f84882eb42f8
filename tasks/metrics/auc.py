"""One-vs-rest ROC AUC, macro-averaged over the classes that have both positives and negatives.

Weighted Mann-Whitney statistic with ties counted one half, exact, for all replicates at once:
AUC = sum_{i in P} w_i (N_<(s_i) + N_=(s_i) / 2) / (W_P W_N), where N_<(s) is the weight of negatives
scoring below s. Per class, the negatives' weights are cumulated once in score order (R x n_neg) and read
at each positive's insertion point, so a replicate costs about two passes over the slice.
"""
import warnings

import numpy as np

from ._registry import SliceData, register


def weighted_auc(scores: np.ndarray, positive: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Return the ROC AUC of `scores` for the `positive` mask under each replicate's weights (R,)."""
    neg_idx = np.flatnonzero(~positive)
    pos_idx = np.flatnonzero(positive)
    neg_idx = neg_idx[np.argsort(scores[neg_idx], kind="stable")]
    neg_scores = scores[neg_idx]
    below = np.searchsorted(neg_scores, scores[pos_idx], side="left")     # negatives strictly below
    upto = np.searchsorted(neg_scores, scores[pos_idx], side="right")     # negatives below or tied
    # Work example-major (n, R): gathering examples copies contiguous rows of R weights, and the cumulative
    # sum runs down rows. `evaluate` hands replicate weights over as a transposed (n, R) array, so this is a view.
    Wt = np.ascontiguousarray(W.T)
    cum = np.zeros((len(neg_idx) + 1, W.shape[0]), dtype=W.dtype)
    np.cumsum(Wt[neg_idx], axis=0, out=cum[1:])
    credit = cum[below]
    if (upto != below).any():
        credit = 0.5 * (credit + cum[upto])
    wp = Wt[pos_idx]
    # cumulated integer weights are exact in float32; the products are summed in float64
    num = np.einsum("ir,ir->r", wp, credit, dtype=np.float64)
    den = wp.sum(0, dtype=np.float64) * cum[-1].astype(np.float64)
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
    with warnings.catch_warnings():      # a replicate with no weight on the slice: NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(values, 1), axis=1) if len(values) > 1 else values[0]
