"""Failure-detection metrics against scikit-learn's roc_auc_score on the same data, in one run.

N samples (default 2,000,000): float64 scores and bool ``correct`` with mistakes leaning towards
high scores. For every metric of ``ebood.metrics`` (and ``ebood.selective.calibrate``) the script
prints the best-of-``--repeats`` time and its ratio to ``sklearn.metrics.roc_auc_score(~correct,
scores)`` measured in the same run (ratio > 1: ebood is faster). ``--ties`` rounds the scores to
1,000 distinct values (heavy ties).

    python benchmarks/failure_metrics.py
    python benchmarks/failure_metrics.py --n 200000 --ties
"""

from __future__ import annotations

import argparse
import platform
import warnings
from typing import Any, Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from ebood import metrics, selective
from _timing import best_time  # benchmarks/_timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ties", action="store_true", help="round the scores to 1,000 distinct values")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores = rng.normal(size=args.n)
    correct = rng.random(args.n) > 0.15 * (1 + np.tanh(scores))
    if args.ties:
        scores = np.round(scores * 100) / 100
    half = args.n // 2
    ood = scores[:half] + 1.0

    sk = best_time(lambda: roc_auc_score(~correct, scores), args.repeats)
    cases: dict[str, Callable[[], Any]] = {
        "misclassification (auroc, fpr95, aupr)": lambda: metrics.misclassification(scores, correct),
        "aurc": lambda: metrics.aurc(scores, correct),
        "e_aurc": lambda: metrics.e_aurc(scores, correct),
        "risk_coverage": lambda: metrics.risk_coverage(scores, correct),
        "selective_risk(coverage=0.8)": lambda: metrics.selective_risk(scores, correct, coverage=0.8),
        "coverage_at_risk(risk=0.05)": lambda: metrics.coverage_at_risk(scores, correct, risk=0.05),
        "failure (N/2 ID + N/2 OOD)": lambda: metrics.failure(scores[half:], correct[half:], ood),
        "selective.calibrate (sgr)": lambda: selective.calibrate(scores, correct, risk=0.1, method="sgr"),
        "selective.calibrate (ltt)": lambda: selective.calibrate(scores, correct, risk=0.1, method="ltt"),
    }
    # the two agree: the same AUROC from one sort
    assert abs(metrics.misclassification(scores, correct)["auroc"] - roc_auc_score(~correct, scores)) < 1e-12

    print(f"N = {args.n:,}{' (tied: 1,000 distinct scores)' if args.ties else ''}; numpy {np.__version__}; "
          f"{platform.processor() or platform.machine()}; best of {args.repeats}")
    print(f"{'sklearn roc_auc_score':44s} {sk * 1e3:9.1f} ms   (baseline)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, fn in cases.items():
            t = best_time(fn, args.repeats)
            print(f"{'ebood ' + name:44s} {t * 1e3:9.1f} ms   {sk / t:5.2f}x roc_auc_score")


if __name__ == "__main__":
    main()
