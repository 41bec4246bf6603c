#!/usr/bin/env python
"""IRM fit time on a pipeline-sized problem: 100k rows x 11.5k sparse SAE features.

The features are a planted sparse problem (each row activates ``--active`` features, a few
features carry the target), the size of the IRM's input for 5 layers of 2304-latent SAEs. Times
the default IRM (max-abs scaling + ridge, strength by 3-fold grouped CV over 4 values, then the
final fit), and the Lasso and ElasticNet IRMs, and prints seconds against the target (<= 20 s on
2 cores) and the ratio of the ridge IRM's time to one bare scikit-learn Ridge fit in this process.

    python benchmarks/irm_fit.py
    python benchmarks/irm_fit.py --rows 100000 --features 11520 --active 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import Ridge

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.irm.estimators import make_irm  # noqa: E402


def planted(rows: int, features: int, active: int, seed: int):
    rng = np.random.default_rng(seed)
    indptr = np.arange(0, rows * active + 1, active)
    indices = np.sort(rng.integers(0, features, (rows, active)), axis=1).ravel()
    data = rng.exponential(1.0, rows * active)
    X = sp.csr_matrix((data, indices, indptr), shape=(rows, features))
    X.sum_duplicates()
    w = np.zeros(features)
    w[rng.choice(features, 64, replace=False)] = rng.standard_normal(64)
    y = X @ w + 0.5 * rng.standard_normal(rows)
    return X, y, w, np.arange(rows) // 40  # 40-token sequences as CV groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=11_520)
    parser.add_argument("--active", type=int, default=200, help="non-zero features per row")
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel CV fits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    X, y, w, groups = planted(args.rows, args.features, args.active, args.seed)
    print(f"problem          {X.shape[0]} x {X.shape[1]} sparse, {X.nnz / X.shape[0]:.0f} active per row")

    start = time.perf_counter()
    Ridge(alpha=10.0, solver="lsqr").fit(X, y)
    bare = time.perf_counter() - start
    print(f"bare Ridge fit   {bare:6.1f} s  (one scikit-learn fit, one strength)")
    for penalty in ("ridge", "lasso", "elasticnet"):
        start = time.perf_counter()
        pipe = make_irm(penalty=penalty, n_jobs=args.n_jobs).fit(X, y, irm__groups=groups)
        seconds = time.perf_counter() - start
        coef = pipe.named_steps["irm"].coef_
        planted_idx = np.flatnonzero(w)
        agree = np.mean(np.sign(coef[planted_idx]) == np.sign(w[planted_idx]))
        print(f"{penalty + ' IRM':<16} {seconds:6.1f} s  (CV over 4 strengths x 3 folds + final fit; "
              f"{seconds / bare:.1f}x one bare fit; planted signs right {agree:.2f}; target <= 20 s)")


if __name__ == "__main__":
    main()
