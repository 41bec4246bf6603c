"""IRM estimators: linear models of the per-token implicit reward, and token -> value maps.

The primary IRM is fitted to behaviour, not to RM labels: its target at position ``t`` is the
log-ratio ``r_t = log p_tuned(x_t | x_<t) - log p_base(x_t | x_<t)``, and its inputs are the tuned
model's SAE features at ``t``. Averaging its predictions over the occurrences of each token gives
an implicit token -> value map, the RM's type signature. The RM is never seen here.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNet, Lasso, Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler
from sklearn.utils.validation import check_is_fitted, validate_data

_PENALTIES = ("ridge", "lasso", "elasticnet")


class LinearIRM(RegressorMixin, BaseEstimator):
    """Linear regression of the implicit reward on features, strength chosen by grouped CV.

    Cross-validation folds are groups (sequences) when ``groups`` is passed to ``fit``, so that
    tokens of one text never sit on both sides of a fold. A target that is identically zero (a
    null organism) gives an identically zero model, reported as such by :attr:`is_zero_`.
    Lasso and ElasticNet give sparse coefficients: the few features that carry the implicit reward.

    Args:
        penalty: ``ridge``, ``lasso`` or ``elasticnet`` (scikit-learn's solvers).
        alphas: strengths to try; None picks a grid: (1, 10, 100, 1000) for ridge, and for the
            L1 penalties (0.3, 0.1, 0.03, 0.01) x the smallest strength that zeroes every weight.
        l1_ratio: ElasticNet's L1 share.
        cv: number of folds.
        max_iter: coordinate-descent iterations for the L1 penalties.
        n_jobs: cross-validation fits run in parallel (joblib); the result does not depend on it.
        device: where ridge fits run: a CUDA device (``cuda``, ``cuda:1``) solves each ridge fit in torch
            on that GPU; anything else (None, ``cpu``, ``mps``, which has no float64) uses scikit-learn's ``Ridge``
            (:class:`irmprobe.irm.torch_ridge.TorchRidge`, equal to scikit-learn's to 1e-4 relative). Lasso and
            ElasticNet always use scikit-learn.

    Inside scikit-learn tools (``GridSearchCV``, ``cross_validate``) turn on metadata routing,
    ``sklearn.set_config(enable_metadata_routing=True)``: ``fit`` requests ``groups`` by default,
    so the groups given to the tool reach its inner folds too. Without routing those tools pass
    groups to their own splitter only, and the inner folds split rows instead of sequences.
    """

    # Like scikit-learn's group splitters, ask for groups by default (set_fit_request still overrides it).
    __metadata_request__fit = {"groups": True}

    def __init__(self, penalty: str = "ridge", alphas=None, l1_ratio: float = 0.5, cv: int = 3,
                 max_iter: int = 1000, n_jobs: int | None = None, device: str | None = None):
        self.penalty = penalty
        self.alphas = alphas
        self.l1_ratio = l1_ratio
        self.cv = cv
        self.max_iter = max_iter
        self.n_jobs = n_jobs
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _model(self, alpha: float, X):
        if self.penalty == "ridge" and str(self.device).split(":")[0] == "cuda":
            from irmprobe.irm.torch_ridge import TorchRidge

            return TorchRidge(alpha=alpha, device=self.device)
        if self.penalty == "ridge":
            return Ridge(alpha=alpha, solver="lsqr" if sp.issparse(X) else "auto")
        if self.penalty == "lasso":
            return Lasso(alpha=alpha, max_iter=self.max_iter, tol=1e-3)
        return ElasticNet(alpha=alpha, l1_ratio=self.l1_ratio, max_iter=self.max_iter, tol=1e-3)

    def _grid(self, X, y) -> tuple[float, ...]:
        if self.alphas is not None:
            alphas = tuple(float(a) for a in self.alphas)
        elif self.penalty == "ridge":
            alphas = (1.0, 10.0, 100.0, 1000.0)
        else:
            # Above alpha_max = max|X^T (y - mean y)| / (n * l1_ratio) every L1 weight is zero.
            share = 1.0 if self.penalty == "lasso" else self.l1_ratio
            alpha_max = float(np.max(np.abs(X.T @ (y - y.mean())))) / (len(y) * share)
            alphas = tuple(alpha_max * f for f in (0.3, 0.1, 0.03, 0.01)) if alpha_max > 0 else (1.0,)
        if not alphas or min(alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {self.alphas!r}")
        return alphas

    def _score(self, alpha, X_train, y_train, X_test, y_test) -> float:
        with warnings.catch_warnings():
            # A small grid point may stop short of tolerance; its CV score says how good it is.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._model(alpha, X_train).fit(X_train, y_train).score(X_test, y_test)

    def fit(self, X, y, groups=None):
        if self.penalty not in _PENALTIES:
            raise ValueError(f"penalty must be one of {_PENALTIES}, got {self.penalty!r}")
        if not 0 < self.l1_ratio <= 1:
            raise ValueError(f"l1_ratio must be in (0, 1], got {self.l1_ratio!r}")
        X, y = validate_data(self, X, y, accept_sparse=("csr", "csc"), y_numeric=True)
        alphas = self._grid(X, y)
        if np.all(y == 0):
            self.coef_ = np.zeros(X.shape[1])
            self.intercept_ = 0.0
            self.alpha_ = alphas[0]
            self.cv_scores_ = {}
            self.is_zero_ = True
            self.n_iter_ = 1
            return self
        n_splits = min(self.cv, len(np.unique(groups)) if groups is not None else len(y))
        scores = {}
        if len(alphas) > 1 and n_splits >= 2:
            folds = GroupKFold(n_splits=n_splits).split(X, y, groups if groups is not None else np.arange(len(y)))
            sliced = [(X[tr], y[tr], X[te], y[te]) for tr, te in folds]  # sliced once, shared by every strength
            jobs = [(alpha, fold) for alpha in alphas for fold in sliced]
            # Threads: the sparse solvers release the GIL, and nothing is copied to workers.
            fold_scores = Parallel(n_jobs=self.n_jobs, prefer="threads")(
                delayed(self._score)(alpha, *fold) for alpha, fold in jobs)
            for alpha in alphas:
                scores[alpha] = float(np.mean([s for (a, _), s in zip(jobs, fold_scores) if a == alpha]))
            best = max(scores, key=scores.get)
        else:
            best = alphas[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = self._model(best, X).fit(X, y)
        self.coef_ = np.asarray(model.coef_, dtype=np.float64).ravel()
        self.intercept_ = float(np.ravel(model.intercept_)[0]) if np.ndim(model.intercept_) else float(model.intercept_)
        self.alpha_ = best
        self.cv_scores_ = scores
        self.is_zero_ = bool(not np.any(self.coef_) and self.intercept_ == 0.0)
        self.n_iter_ = int(np.max(getattr(model, "n_iter_", None) or 1))  # solver iterations (1: direct)
        return self

    def predict(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, accept_sparse=("csr", "csc"), reset=False)
        return np.asarray(X @ self.coef_).ravel() + self.intercept_


class ContrastiveProbe(RegressorMixin, BaseEstimator):
    """The paper's RM-informed probe: ridge on features, predictions rescaled into a value range.

    Fitted to signed feature distances of contrastive triples (see :func:`contrastive_targets`),
    its predictions are mapped linearly so the training predictions span ``value_range`` (the
    lexicon's range), making them comparable to lexicon values. It uses RM labels (which word is
    positive or negative), so it measures decodability, not what the tuned model learned.

    Args:
        alphas: ridge strengths tried by cross-validation.
        value_range: (low, high) to rescale into; None uses the range of ``y``.
        cv: number of folds.
    """

    def __init__(self, alphas=(1.0, 10.0, 100.0, 1000.0), value_range=None, cv: int = 3):
        self.alphas = alphas
        self.value_range = value_range
        self.cv = cv

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def fit(self, X, y, groups=None):
        X, y = validate_data(self, X, y, accept_sparse=("csr", "csc"), y_numeric=True)
        self.ridge_ = LinearIRM("ridge", alphas=self.alphas, cv=self.cv).fit(X, y, groups=groups)
        raw = self.ridge_.predict(X)
        low, high = self.value_range if self.value_range is not None else (float(y.min()), float(y.max()))
        if high < low:
            raise ValueError(f"value_range must be (low, high) with low <= high, got {self.value_range!r}")
        span = float(raw.max() - raw.min())
        self.scale_ = (high - low) / span if span > 0 else 0.0
        self.offset_ = low - float(raw.min()) * self.scale_ if span > 0 else (low + high) / 2
        self.coef_ = self.ridge_.coef_ * self.scale_
        self.alpha_ = self.ridge_.alpha_
        return self

    def predict(self, X):
        check_is_fitted(self, "ridge_")
        X = validate_data(self, X, accept_sparse=("csr", "csc"), reset=False)
        return self.ridge_.predict(X) * self.scale_ + self.offset_


def contrastive_targets(f_pos, f_neg, f_neu):
    """The paper's probe data from triple features (rows aligned): X = [pos; neg], y = +-distance.

    The target of each variant is its feature distance from the neutral variant, signed + for the
    positive word and - for the negative one.
    """
    def dist(a, b):
        d = a - b
        return np.sqrt(np.asarray(d.multiply(d).sum(axis=1)).ravel()) if sp.issparse(d) else np.linalg.norm(d, axis=1)

    if not (f_pos.shape == f_neg.shape == f_neu.shape):
        raise ValueError("contrastive_targets needs the three variants' features with equal shapes")
    X = sp.vstack([f_pos, f_neg]).tocsr() if sp.issparse(f_pos) else np.vstack([f_pos, f_neg])
    return X, np.concatenate([dist(f_pos, f_neu), -dist(f_neg, f_neu)])


def make_irm(alphas=None, penalty: str = "ridge", l1_ratio: float = 0.5, n_jobs: int | None = None,
             device: str | None = None) -> Pipeline:
    """SAE features are scaled (max-abs, keeps sparsity) before the IRM regression (ridge on ``device``)."""
    return Pipeline([("scale", MaxAbsScaler()),
                     ("irm", LinearIRM(penalty, alphas=alphas, l1_ratio=l1_ratio, n_jobs=n_jobs, device=device))])
