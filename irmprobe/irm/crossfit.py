"""Fitting IRMs by group: two-fold cross-fitting, held-out splits, token -> value maps, the random probe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn import get_config
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler

from irmprobe.irm.estimators import make_irm


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
    """Weights on max-abs-scaled inputs."""
    scale: np.ndarray | None = None
    """Each input's max |value| on the training rows (the scaler), so new rows predict as
    ``(x / scale) @ coef + intercept``."""
    intercept: float = 0.0


def split_groups(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test), split by group (the prompt, for captured rows): no group on both sides."""
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return train, test


def fit_irm(
    name: str,
    X: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    alphas=None,
    test_fraction: float,
    seed: int,
    shuffle_target: bool = False,
    shuffle_seed: int | None = None,
    penalty: str = "ridge",
    l1_ratio: float = 0.5,
    n_jobs: int | None = None,
) -> IRMFit:
    """Fit the IRM pipeline on training sequences, score R^2 on held-out ones, predict all rows.

    With ``shuffle_target`` the training targets are permuted first (by ``shuffle_seed``, default
    ``seed``): the shuffled-label baseline, on the same split as every other view.
    """
    train, test = split_groups(groups, test_fraction, seed)
    y_train = y[train]
    if shuffle_target:
        y_train = np.random.default_rng(seed if shuffle_seed is None else shuffle_seed).permutation(y_train)
    pipe = make_irm(alphas, penalty, l1_ratio, n_jobs)
    # With metadata routing on, the pipeline routes ``groups`` to LinearIRM (which requests it).
    routed = get_config().get("enable_metadata_routing", False)
    pipe.fit(X[train], y_train, **{"groups" if routed else "irm__groups": groups[train]})
    irm = pipe.named_steps["irm"]
    r2 = None if irm.is_zero_ else float(pipe.score(X[test], y[test]))
    return IRMFit(name, pipe.predict(X), r2, irm.alpha_, bool(irm.is_zero_), irm.coef_,
                  pipe.named_steps["scale"].scale_, irm.intercept_)


def random_probe(X, seed: int) -> IRMFit:
    """The untrained-probe baseline: Gaussian weights on max-abs-scaled features, never fitted."""
    scaled = MaxAbsScaler().fit_transform(X)
    coef = np.random.default_rng(seed).standard_normal(X.shape[1]) / np.sqrt(X.shape[1])
    return IRMFit("random_probe", np.asarray(scaled @ coef).ravel(), None, None, False, coef)


def two_folds(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two halves of the groups (prompts): the folds every view is cross-fitted on."""
    return split_groups(groups, 0.5, seed)


def cross_fit_irm(
    name: str,
    X: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: tuple[np.ndarray, np.ndarray],
    alphas=None,
    shuffle_target: bool = False,
    shuffle_seed: int = 0,
    penalty: str = "ridge",
    l1_ratio: float = 0.5,
    n_jobs: int | None = None,
    device: str | None = None,
    score_rows: np.ndarray | None = None,
) -> IRMFit:
    """Two-fold cross-fitting by group: each row is predicted by the model fitted on the other fold.

    ``groups`` are the independent units (prompts): the folds are halves of them, and the strength is
    chosen by CV grouped the same way inside the first fold and reused for the second, so no prediction
    ever saw a copy of its own row. ``test_r2`` is the R^2 of these out-of-fold predictions on
    ``score_rows`` (default: every row; the views leave out prompt rows, which are fitted on, never scored).
    The weights returned (``coef``, ``scale``, ``intercept``) are a refit on every row with that
    strength: the model users score new text with, never the one the figures were computed from.
    With ``shuffle_target`` the targets are permuted within each training fold (the shuffled baseline).
    """
    routed = get_config().get("enable_metadata_routing", False)
    rng = np.random.default_rng(shuffle_seed)

    def fit_on(rows, grid):
        target = rng.permutation(y[rows]) if shuffle_target else y[rows]
        pipe = make_irm(grid, penalty, l1_ratio, n_jobs, device)
        pipe.fit(X[rows], target, **{"groups" if routed else "irm__groups": groups[rows]})
        return pipe

    a, b = folds
    first = fit_on(a, alphas)
    alpha = first.named_steps["irm"].alpha_
    second = fit_on(b, (alpha,))
    predictions = np.zeros(len(y))
    predictions[b] = first.predict(X[b])
    predictions[a] = second.predict(X[a])
    full = fit_on(np.arange(len(y)), (alpha,))
    irm = full.named_steps["irm"]
    zero = bool(first.named_steps["irm"].is_zero_ and second.named_steps["irm"].is_zero_ and irm.is_zero_)
    if zero:
        predictions[:] = 0.0
    scored = np.arange(len(y)) if score_rows is None else np.asarray(score_rows)
    ys, ps = y[scored], predictions[scored]
    r2 = None if zero else float(1 - np.sum((ys - ps) ** 2) / max(np.sum((ys - ys.mean()) ** 2), 1e-300))
    return IRMFit(name, predictions, r2, alpha, zero, irm.coef_, full.named_steps["scale"].scale_, irm.intercept_)


def preference_probe(pooled, rewards: np.ndarray, prompt_index: np.ndarray, *, source: np.ndarray | None = None,
                     seed: int = 0):
    """The paper's logistic preference probe on mean-pooled features, trained on RM preferences.

    For each prompt (and, with ``source``, each model that continued it) the highest- and lowest-reward
    continuation form a (chosen, rejected) pair: never a base text against a tuned one, whose feature
    difference also tells which model wrote it. A logistic regression (scikit-learn, strength by CV)
    classifies the sign of each pair's feature difference (both orders, no intercept: a Bradley-Terry
    model), trained on three quarters of the prompts and scored on the rest (a prompt's pairs stay on one
    side). Returns the fitted pipeline and its held-out pairwise accuracy, or (None, None) when fewer than
    8 pairs differ in reward.
    """
    keys = np.asarray(prompt_index) if source is None else np.char.add(np.asarray(prompt_index).astype(str),
                                                                       np.char.add("/", np.asarray(source).astype(str)))
    pairs, units = [], []
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        hi, lo = rows[np.argmax(rewards[rows])], rows[np.argmin(rewards[rows])]
        if rewards[hi] > rewards[lo]:
            pairs.append((hi, lo))
            units.append(prompt_index[hi])
    if len(pairs) < 8:
        return None, None
    chosen, rejected = (np.array(c) for c in zip(*pairs))
    diff = pooled[chosen] - pooled[rejected]
    diff = sp.csr_matrix(diff) if sp.issparse(diff) else np.asarray(diff)
    X = sp.vstack([diff, -diff]).tocsr() if sp.issparse(diff) else np.vstack([diff, -diff])
    y = np.r_[np.ones(len(pairs)), np.zeros(len(pairs))]
    groups = np.r_[units, units]
    train, test = split_groups(groups, 0.25, seed)
    model = make_pipeline(MaxAbsScaler(), LogisticRegressionCV(Cs=5, cv=3, fit_intercept=False, max_iter=2000, l1_ratios=(0.0,),
                                                              scoring="accuracy", use_legacy_attributes=False))
    model.fit(X[train], y[train])
    return model, float(model.score(X[test], y[test]))
