"""One-vs-rest ROC AUC, macro-averaged over the classes that have both positives and negatives.

Weighted Mann-Whitney statistic with ties counted one half, exact, for all replicates at once:
AUC = sum_{i in P} w_i (N_<(s_i) + N_=(s_i) / 2) / (W_P W_N), where N_<(s) is the weight of negatives
scoring below s. In score order, the negatives between two consecutive positives form a gap; one
scatter-add of every example's weight row into its gap (positives into a discarded row) gives the gaps'
weights for all replicates in a single pass over the slice, a cumulative sum over the (few) gaps gives each
positive's N_<, and a dot product with the positives' weights gives the numerator. Poisson weights are small
integers, so the gap and cumulative sums are exact in float32 (below 2**24, which `weight_dtype` ensures);
the final dot product is accumulated in float64, where its integer products and their sum are exact too: the
AUC does not depend on the order in which the CPU sums.
"""
import warnings

import numpy as np
import torch

from ._registry import SliceData, register


def _cumsum_rows(a: np.ndarray, block: int = 64) -> np.ndarray:
    """Cumulative sum down the rows of a C-contiguous (n, R) array, in place: a row-by-row scan inside blocks
    of rows, then each block's carry (about twice as fast as np.cumsum / torch.cumsum along axis 0)."""
    full = a.shape[0] // block * block
    if full:
        v = a[:full].reshape(full // block, block, -1)
        for i in range(1, block):
            v[:, i] += v[:, i - 1]
        ends = v[:, -1]
        np.cumsum(ends, 0, out=ends)
        v[1:, :-1] += ends[:-1, None, :]
    for i in range(max(full, 1), a.shape[0]):
        a[i] += a[i - 1]
    return a


def _plan(order: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For examples in ascending score `order`: each example's gap (the number of positives before it, or the
    discarded row n_pos for positives and for negatives above every positive), the positives' rows in score
    order, and n_pos."""
    is_pos = positive[order]
    n_pos = int(is_pos.sum())
    gap = np.cumsum(is_pos) - is_pos
    index = np.empty(len(order), dtype=np.int64)
    index[order] = np.where(is_pos | (gap >= n_pos), n_pos, gap)
    return index, order[is_pos], n_pos


def _numerator(plan, Wt: np.ndarray, shared: dict) -> tuple[np.ndarray, np.ndarray]:
    """Return (sum_{i in P} w_i N_<(s_i), W_P) per replicate (float64), N_< counting the negatives before i in
    the plan's order."""
    index, pos_rows, n_pos = plan
    buffer = shared.get("buffer")
    if buffer is None or buffer.shape[0] < n_pos + 1 or buffer.dtype != Wt.dtype:
        buffer = shared["buffer"] = np.empty((len(index) + 1, Wt.shape[1]), dtype=Wt.dtype)
    gaps = buffer[:n_pos + 1]
    gaps.fill(0)
    torch.from_numpy(gaps).index_add_(0, torch.from_numpy(index), torch.from_numpy(Wt))
    below = _cumsum_rows(gaps[:n_pos])                   # weight of the negatives below the p-th positive
    wp = Wt[pos_rows]
    # integer weights: float64 holds the products and their sum exactly
    return np.einsum("ir,ir->r", wp, below, dtype=np.float64), wp.sum(0, dtype=np.float64)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, W: np.ndarray, shared: dict | None = None,
                 cache: dict | None = None) -> np.ndarray:
    """Return the ROC AUC of `scores` for the `positive` mask under each replicate's weights W (R, n).
    `shared` carries the total weights and a scratch buffer between calls on the same W; `cache` keeps the
    sort plan between calls on the same scores and mask (both optional dicts)."""
    # example-major (n, R): `evaluate` hands weights over as the transpose of an (n, R) array, so this is a view
    Wt = np.ascontiguousarray(W.T)
    shared = shared if shared is not None else {}
    if shared.get("total") is None:
        shared["total"] = Wt.sum(0, dtype=np.float64)
    plans = cache.get("plans") if cache is not None and "plans" in cache else None
    if plans is None:
        order = np.argsort(scores, kind="stable")
        s, p = scores[order], positive[order]
        tied = s[1:] == s[:-1]
        if tied.any() and (p[1:][tied] != p[:-1][tied]).any():
            # a positive tied with a negative counts one half: average N_< (positives first among equal
            # scores) and N_<= (negatives first)
            plans = [_plan(np.lexsort((~positive, scores)), positive), _plan(np.lexsort((positive, scores)), positive)]
        else:
            plans = [_plan(order, positive)]
        if cache is not None:
            cache["plans"] = plans
    results = [_numerator(plan, Wt, shared) for plan in plans]
    num = sum(r[0] for r in results) / len(results)
    wp = results[0][1]
    den = wp * (shared["total"] - wp)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


@register("auc_ovr_macro", higher_is_better=True)
def auc_ovr_macro(d: SliceData, W: np.ndarray) -> np.ndarray:
    """Mean over classes of the one-vs-rest ROC AUC of p(class) (scikit-learn's `roc_auc_score`,
    multi_class='ovr', average='macro'), over classes with positives and negatives in the slice."""
    values, shared = [], {}
    for k in range(d.num_classes):
        positive = d.labels == k
        if positive.all() or not positive.any():
            continue
        values.append(weighted_auc(d.probabilities[:, k], positive, W, shared, d.cache.setdefault(("auc", k), {})))
    if not values:
        return np.full(W.shape[0], np.nan)
    with warnings.catch_warnings():      # a replicate with no weight on the slice: NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(values, 1), axis=1) if len(values) > 1 else values[0]
