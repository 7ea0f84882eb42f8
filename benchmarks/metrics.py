"""Benchmark: per-slice metrics with 1,000 bootstrap replicates, xaudit vs Fairlearn MetricFrame(n_boot).

    python benchmarks/metrics.py [--n 100000] [--replicates 1000] [--fairlearn-boot 10]

Data: n examples, 10 classes, slices = overall + site (4) + group (5) + site x group (20) + confidence
deciles (10) = 40. Same metrics on both sides: accuracy, top-3 accuracy, macro precision/recall/F1,
log loss, Brier, ECE (15 bins), one-vs-rest macro AUC. Fairlearn resamples in a Python loop over
replicates, so it is timed at --fairlearn-boot replicates and its per-replicate cost is extrapolated to
--replicates (printed as such). Both sides run in this process, one after the other.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xaudit.tasks.metrics import evaluate  # noqa: E402
from xaudit.tasks.metrics.probabilistic import ece_bins  # noqa: E402

METRICS = ["accuracy", "top_3_accuracy", "precision_macro", "recall_macro", "f1_macro", "log_loss", "brier", "ece",
           "auc_ovr_macro"]


def make_data(n: int, k: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += rng.normal(1.5, 1.0, n)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    md = pd.DataFrame({"site": rng.choice(list("ABCD"), n), "group": rng.choice(list("vwxyz"), n),
                       "confidence": p.max(1)})
    return y, p, md


def fairlearn_time(y, p, md, n_boot: int, k: int = 10) -> tuple[float, int]:
    from fairlearn.metrics import MetricFrame
    from sklearn import metrics as skm
    labels = list(range(k))
    P = p

    def ece(yt, idx):
        conf, pred = P[idx].max(1), P[idx].argmax(1)
        b = ece_bins(conf)
        return sum((b == i).mean() * abs((pred[b == i] == yt[b == i]).mean() - conf[b == i].mean())
                   for i in range(15) if (b == i).any())
    # y_pred carries row indices, so each metric can read the probabilities of the rows Fairlearn picked
    fns = {
        "accuracy": lambda yt, i: skm.accuracy_score(yt, P[i].argmax(1)),
        "top_3_accuracy": lambda yt, i: skm.top_k_accuracy_score(yt, P[i], k=3, labels=labels),
        "precision_macro": lambda yt, i: skm.precision_score(yt, P[i].argmax(1), average="macro", zero_division=0),
        "recall_macro": lambda yt, i: skm.recall_score(yt, P[i].argmax(1), average="macro", zero_division=0),
        "f1_macro": lambda yt, i: skm.f1_score(yt, P[i].argmax(1), average="macro", zero_division=0),
        "log_loss": lambda yt, i: skm.log_loss(yt, P[i], labels=labels),
        "brier": lambda yt, i: skm.brier_score_loss(yt, P[i], labels=labels),
        "ece": ece,
        "auc_ovr_macro": lambda yt, i: skm.roc_auc_score(yt, P[i], multi_class="ovr", labels=labels),
    }
    idx = np.arange(len(y))
    decile = pd.qcut(md.confidence, 10, labels=False)
    feature_sets = [md[["site"]], md[["group"]], md[["site", "group"]], decile.rename("decile").to_frame()]
    t0 = time.perf_counter()
    slices = 1
    for feats in feature_sets:
        mf = MetricFrame(metrics=fns, y_true=y, y_pred=idx, sensitive_features=feats,
                         n_boot=n_boot or None, ci_quantiles=[0.025, 0.975] if n_boot else None, random_state=0)
        slices += len(mf.by_group)
    return time.perf_counter() - t0, slices


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--fairlearn-boot", type=int, default=10)
    args = ap.parse_args()
    y, p, md = make_data(args.n)
    slices = [[], ["site"], ["group"], ["site", "group"], ["confidence:q10"]]
    evaluate(y[:2000], p[:2000], md[:2000], slices=slices, metrics=METRICS, replicates=10)       # warm-up
    t0 = time.perf_counter()
    ev = evaluate(y, p, md, slices=slices, metrics=METRICS, replicates=args.replicates, seed=0)
    ours = time.perf_counter() - t0
    n_slices = ev.table[["slice_key", "slice_value"]].drop_duplicates().shape[0]
    base, _ = fairlearn_time(y, p, md, 0)
    boot, fl_slices = fairlearn_time(y, p, md, args.fairlearn_boot)
    per_rep = max(0.0, boot - base) / args.fairlearn_boot
    fair = base + per_rep * args.replicates
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"data: {args.n:,} examples, 10 classes, {n_slices} slices (Fairlearn: {fl_slices}), "
          f"{len(METRICS)} metrics, {args.replicates:,} replicates\n")
    print("| implementation | replicates run | time (s) | time for 1,000 replicates (s) |")
    print("|---|---|---|---|")
    print(f"| xaudit `evaluate` (Poisson bootstrap, vectorised) | {args.replicates:,} | {ours:.2f} | "
          f"{ours * 1000 / max(args.replicates, 1):.2f} |")
    print(f"| Fairlearn `MetricFrame`, no bootstrap | 0 | {base:.2f} | – |")
    print(f"| Fairlearn `MetricFrame(n_boot={args.fairlearn_boot})` | {args.fairlearn_boot} | {boot:.2f} | "
          f"{fair:.1f} (extrapolated: {per_rep:.2f} s per replicate) |")
    print(f"\nratio (Fairlearn / xaudit, 1,000 replicates): {fair / (ours * 1000 / max(args.replicates, 1)):.0f}x")


if __name__ == "__main__":
    main()
