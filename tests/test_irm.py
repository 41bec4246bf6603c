import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.irm import LinearIRM, fit_irm, token_map


def _planted(n=3000, d=200, k=10, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, d)) * (rng.random((n, d)) < 0.05)  # sparse non-negative "SAE features"
    w = np.zeros(d)
    w[:k] = np.linspace(2.0, -2.0, k)  # planted weights, a known ranking with both signs
    y = dense @ w + 0.05 * rng.standard_normal(n)
    return sp.csr_matrix(dense), y, w, np.arange(n) // 10


def test_linear_irm_recovers_planted_signs_and_ranking():
    X, y, w, groups = _planted()
    fit = fit_irm("sae_irm", X, y, groups, alphas=(0.1, 1.0, 10.0), test_fraction=0.2, seed=0)
    coef = fit.coef
    planted = np.flatnonzero(w)
    assert np.all(np.sign(coef[planted]) == np.sign(w[planted]))
    assert np.all(np.diff(coef[planted]) < 0)  # same ranking as the planted weights
    assert np.max(np.abs(np.delete(coef, planted))) < 0.2 * np.min(np.abs(w[planted]))
    assert fit.test_r2 > 0.9


def test_shuffled_target_baseline_learns_nothing():
    X, y, _, groups = _planted()
    fit = fit_irm("baseline", X, y, groups, alphas=(0.1, 1.0, 10.0, 100.0), test_fraction=0.2, seed=0,
                  shuffle_target=True)
    assert fit.test_r2 < 0.05


def test_zero_target_gives_identically_zero_irm():
    X, _, _, groups = _planted(n=200)
    est = LinearIRM().fit(X, np.zeros(200), groups=groups)
    assert est.is_zero_
    assert np.all(est.predict(X) == 0)


def test_token_map_averages_occurrences():
    m = token_map(np.array([5, 7, 5, 5, 9]), np.array([1.0, 2.0, 2.0, 3.0, 4.0]), min_count=2)
    assert m == {5: (2.0, 3)}
    with pytest.raises(ValueError, match="differ in shape"):
        token_map(np.array([1, 2]), np.array([1.0]))


def test_bad_alphas_raise():
    X, y, _, _ = _planted(n=100)
    with pytest.raises(ValueError, match="alphas must be positive"):
        LinearIRM(alphas=(0.0,)).fit(X, y)


def test_sklearn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(LinearIRM(alphas=(1.0,)))
