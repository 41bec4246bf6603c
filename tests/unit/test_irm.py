import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.irm.crossfit import fit_irm, preference_probe, random_probe, token_map
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


def _duplicated_prompts(n_prompts=40, n_seq=6, prompt_len=5, gen_len=5, d=400, seed=0):
    """Rows of n_prompts prompts, each continued by n_seq sequences: a prompt's rows are identical copies in
    every sequence (same features, same target); generated rows are each their own. The target is pure
    noise per distinct row, so only memorising a row's copies can predict it."""
    rng = np.random.default_rng(seed)
    prompt_x = rng.standard_normal((n_prompts, prompt_len, d))
    prompt_y = rng.standard_normal((n_prompts, prompt_len))
    X, y, seq, prompt, is_prompt = [], [], [], [], []
    for p in range(n_prompts):
        for s in range(n_seq):
            X += [prompt_x[p], rng.standard_normal((gen_len, d))]
            y += [prompt_y[p], rng.standard_normal(gen_len)]
            seq += [p * n_seq + s] * (prompt_len + gen_len)
            prompt += [p] * (prompt_len + gen_len)
            is_prompt += [True] * prompt_len + [False] * gen_len
    return np.vstack(X), np.concatenate(y), np.array(seq), np.array(prompt), np.array(is_prompt)


def test_folds_by_prompt_do_not_memorise_copies_of_prompt_rows_that_folds_by_sequence_do():
    from irmprobe.irm.crossfit import cross_fit_irm, two_folds

    X, y, seq, prompt, is_prompt = _duplicated_prompts()
    rows = np.flatnonzero(is_prompt)  # the rows a sequence split puts on both sides
    alphas = (1e-3, 1e-1, 10.0, 1e3, 1e5)
    by_seq = cross_fit_irm("irm", X, y, seq, folds=two_folds(seq, 0), alphas=alphas, score_rows=rows)
    by_prompt = cross_fit_irm("irm", X, y, prompt, folds=two_folds(prompt, 0), alphas=alphas, score_rows=rows)
    assert by_seq.test_r2 > 0.5, by_seq.test_r2  # "out of fold" only in name: the copies were fitted on
    assert by_prompt.test_r2 <= 0.0, by_prompt.test_r2
    # Folds by prompt keep every copy of a prompt's rows on one side.
    a, b = two_folds(prompt, 0)
    assert not set(prompt[a]) & set(prompt[b]) and set(seq[a]) & set(seq[b]) == set()


def test_preference_probe_pairs_texts_of_one_model_so_it_cannot_learn_which_model_wrote_them():
    rng = np.random.default_rng(2)
    n_prompts, per = 150, 6
    pooled = rng.random((n_prompts * per, 20))
    tuned = np.tile(np.r_[np.zeros(per // 2), np.ones(per // 2)], n_prompts)
    pooled[:, 2] = tuned + 0.05 * rng.standard_normal(len(pooled))  # a feature that says which model wrote it
    rewards = pooled[:, 0] - pooled[:, 1] + 3.0 * tuned  # the tuned model's texts earn more
    prompt_index = np.repeat(np.arange(n_prompts), per)
    source = np.where(tuned == 1, "tuned", "base")
    across, _ = preference_probe(sp.csr_matrix(pooled), rewards, prompt_index, seed=0)
    within, acc = preference_probe(sp.csr_matrix(pooled), rewards, prompt_index, source=source, seed=0)
    c_across, c_within = across[-1].coef_.ravel(), within[-1].coef_.ravel()
    assert np.argmax(np.abs(c_across)) == 2  # best vs worst across models: it learns the model's identity
    assert abs(c_within[2]) < 0.2 * min(abs(c_within[0]), abs(c_within[1])) and acc > 0.85
