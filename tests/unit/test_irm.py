import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.irm.crossfit import fit_irm, random_probe, token_map
from irmprobe.irm.crossfit import preference_probe
from irmprobe.irm.estimators import ContrastiveProbe, LinearIRM, contrastive_targets


def _planted(n=3000, d=200, k=10, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, d)) * (rng.random((n, d)) < 0.05)  # sparse non-negative "SAE features"
    w = np.zeros(d)
    w[:k] = np.linspace(2.0, -2.0, k)  # planted weights, a known ranking with both signs
    y = dense @ w + 0.05 * rng.standard_normal(n)
    return sp.csr_matrix(dense), y, w, np.arange(n) // 10


@pytest.mark.parametrize("penalty", ["ridge", "lasso", "elasticnet"])
def test_each_irm_estimator_recovers_planted_signs_and_ranking(penalty):
    X, y, w, groups = _planted()
    alphas = (0.1, 1.0, 10.0) if penalty == "ridge" else None
    fit = fit_irm("sae_irm", X, y, groups, alphas=alphas, test_fraction=0.2, seed=0, penalty=penalty)
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


def test_l1_irms_are_sparse():
    X, y, w, groups = _planted()
    for penalty in ("lasso", "elasticnet"):
        coef = fit_irm("v", X, y, groups, test_fraction=0.2, seed=0, penalty=penalty).coef
        assert np.count_nonzero(coef) < 0.5 * len(coef)  # ridge would give every weight a value
        assert set(np.flatnonzero(w)) <= set(np.flatnonzero(coef))


@pytest.mark.parametrize("estimator", [LinearIRM(alphas=(1.0,)), LinearIRM("lasso"), LinearIRM("elasticnet"),
                                       ContrastiveProbe(alphas=(1.0,))], ids=lambda e: repr(e))
def test_sklearn_estimator_checks(estimator):
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(estimator)


def test_bad_penalty_raises():
    X, y, _, _ = _planted(n=100)
    with pytest.raises(ValueError, match="penalty must be one of"):
        LinearIRM("l2").fit(X, y)


def test_contrastive_probe_recovers_planted_direction_and_rescales():
    rng = np.random.default_rng(0)
    n, d = 400, 30
    neu = rng.random((n, d))
    direction = np.zeros(d)
    direction[:3] = [1.0, 0.5, -0.5]
    strength = rng.uniform(0.5, 2.0, n)
    pos, neg = neu + strength[:, None] * direction, neu - strength[:, None] * direction
    X, y = contrastive_targets(pos, neg, neu)
    assert np.allclose(y[:n], strength * np.linalg.norm(direction)) and np.all(y[n:] < 0)
    probe = ContrastiveProbe(alphas=(0.01, 0.1), value_range=(-4.0, 4.0)).fit(X, y)
    pred = probe.predict(X)
    assert pred.min() == pytest.approx(-4.0) and pred.max() == pytest.approx(4.0)
    assert np.all(np.sign(probe.coef_[:3]) == np.sign(direction[:3]))
    from scipy.stats import kendalltau

    assert kendalltau(pred, y).statistic > 0.8  # distance is not linear in the features: close, not exact


def test_preference_probe_learns_planted_preference():
    rng = np.random.default_rng(1)
    n_prompts, per = 120, 4
    pooled = rng.random((n_prompts * per, 20))
    rewards = pooled[:, 0] - pooled[:, 1] + 0.05 * rng.standard_normal(len(pooled))
    prompt_index = np.repeat(np.arange(n_prompts), per)
    model, acc = preference_probe(sp.csr_matrix(pooled), rewards, prompt_index, seed=0)
    coef = model[-1].coef_.ravel()
    assert acc > 0.85
    assert coef[0] > 0 > coef[1] and np.argmax(np.abs(coef)) in (0, 1)
    assert preference_probe(pooled[:8], rewards[:8], prompt_index[:8]) == (None, None)  # too few pairs


def test_random_probe_is_seeded_and_unfitted():
    X, y, _, _ = _planted(n=500)
    a, b = random_probe(X, 3), random_probe(X, 3)
    assert np.array_equal(a.predictions, b.predictions) and a.test_r2 is None
    assert abs(np.corrcoef(a.predictions, y)[0, 1]) < 0.2
