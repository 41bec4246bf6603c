"""IRM estimators: linear models of the per-token implicit reward, and token -> value maps.

The primary IRM is fitted to behaviour, not to RM labels: its target at position ``t`` is the
log-ratio ``r_t = log p_tuned(x_t | x_<t) - log p_base(x_t | x_<t)``, and its inputs are the tuned
model's SAE features at ``t``. Averaging its predictions over the occurrences of each token gives
an implicit token -> value map, the RM's type signature. The RM is never seen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler
from sklearn.utils.validation import check_is_fitted, validate_data


class LinearIRM(RegressorMixin, BaseEstimator):
    """Ridge regression of the implicit reward on features, strength chosen by grouped CV.

    Cross-validation folds are groups (sequences) when ``groups`` is passed to ``fit``, so that
    tokens of one text never sit on both sides of a fold. A target that is identically zero (a
    null organism) gives an identically zero model, reported as such by :attr:`is_zero_`.

    Args:
        alphas: Ridge strengths to try.
        cv: number of folds.
    """

    def __init__(self, alphas=(1.0, 10.0, 100.0, 1000.0), cv: int = 3):
        self.alphas = alphas
        self.cv = cv

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def fit(self, X, y, groups=None):
        X, y = validate_data(self, X, y, accept_sparse=("csr", "csc"), y_numeric=True)
        alphas = tuple(float(a) for a in self.alphas)
        if not alphas or min(alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {self.alphas!r}")
        if np.all(y == 0):
            self.coef_ = np.zeros(X.shape[1])
            self.intercept_ = 0.0
            self.alpha_ = alphas[0]
            self.cv_scores_ = {}
            self.is_zero_ = True
            return self
        n_splits = min(self.cv, len(np.unique(groups)) if groups is not None else len(y))
        scores = {}
        if len(alphas) > 1 and n_splits >= 2:
            folds = GroupKFold(n_splits=n_splits).split(X, y, groups if groups is not None else np.arange(len(y)))
            folds = list(folds)
            for alpha in alphas:
                fold_scores = [Ridge(alpha=alpha).fit(X[tr], y[tr]).score(X[te], y[te]) for tr, te in folds]
                scores[alpha] = float(np.mean(fold_scores))
            best = max(scores, key=scores.get)
        else:
            best = alphas[0]
        model = Ridge(alpha=best).fit(X, y)
        self.coef_ = np.asarray(model.coef_, dtype=np.float64)
        self.intercept_ = float(model.intercept_)
        self.alpha_ = best
        self.cv_scores_ = scores
        self.is_zero_ = bool(not np.any(self.coef_) and self.intercept_ == 0.0)
        return self

    def predict(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, accept_sparse=("csr", "csc"), reset=False)
        return np.asarray(X @ self.coef_).ravel() + self.intercept_


def make_irm(alphas=(1.0, 10.0, 100.0, 1000.0)) -> Pipeline:
    """SAE features are scaled (max-abs, keeps sparsity) before the IRM regression."""
    return Pipeline([("scale", MaxAbsScaler()), ("irm", LinearIRM(alphas=alphas))])


def token_map(token_ids: np.ndarray, values: np.ndarray, min_count: int = 1) -> dict[int, tuple[float, int]]:
    """Average ``values`` over the occurrences of each token: token -> (mean, count)."""
    token_ids = np.asarray(token_ids)
    values = np.asarray(values, dtype=np.float64)
    if token_ids.shape != values.shape:
        raise ValueError(f"token_ids {token_ids.shape} and values {values.shape} differ in shape")
    uniq, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=values, minlength=len(uniq))
    return {int(t): (float(s / c), int(c)) for t, s, c in zip(uniq, sums, counts) if c >= min_count}


@dataclass(frozen=True)
class IRMFit:
    """One fitted IRM view: its predictions on every row and its token -> value map."""

    name: str
    predictions: np.ndarray
    """Predicted implicit reward at every captured row."""
    test_r2: float | None
    """R^2 of the fit on held-out sequences (None for views that are not fitted)."""
    alpha: float | None
    is_zero: bool
    """True when the IRM is identically zero (nothing was learned)."""
    coef: np.ndarray | None = None


def split_groups(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test), split by sequence."""
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return train, test


def fit_irm(
    name: str,
    X: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    alphas,
    test_fraction: float,
    seed: int,
    shuffle_target: bool = False,
) -> IRMFit:
    """Fit the IRM pipeline on training sequences, score R^2 on held-out ones, predict all rows.

    With ``shuffle_target`` the training targets are permuted first: the shuffled-label baseline.
    """
    train, test = split_groups(groups, test_fraction, seed)
    y_train = y[train]
    if shuffle_target:
        y_train = np.random.default_rng(seed).permutation(y_train)
    pipe = make_irm(alphas)
    pipe.fit(X[train], y_train, irm__groups=groups[train])
    irm = pipe.named_steps["irm"]
    r2 = None if irm.is_zero_ else float(pipe.score(X[test], y[test]))
    return IRMFit(name, pipe.predict(X), r2, irm.alpha_, bool(irm.is_zero_), irm.coef_)
