"""benchmarks/calibration.py: the known-set check bounds discovery's recall, and keeps its level on nulls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("calibration")


def _organisms(seed: int, *, k: int = 6, v: int = 3000, known: int = 29, raise_by: float = 0.0):
    """k pool organisms and one organism: token changes of spread 0.3 (the demo pool's median sd on the planted
    words), each organism's own change of normaliser, the first ``known`` tokens raised by ``raise_by``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (k + 1, v)) + rng.normal(0, 2.0, (k + 1, 1))
    x[0, :known] += raise_by
    return x[0], x[1:], np.arange(known), np.arange(v)


def test_known_tokens_raised_far_beyond_the_pools_spread_all_pass_and_the_set_stands_out(bench):
    organism, pool, known, tokens = _organisms(0, raise_by=4.0)
    out = bench.known_set_power(organism, pool, known, tokens)
    assert out["n"] == 29 and out["raised"] == 29 and out["bonferroni"] >= 27 and out["df"] == 5
    assert out["set_t"] > 8 and out["set_p"] < 1e-4
    assert out["median_change"] == pytest.approx(4.0, abs=0.2)  # centred: each organism's normaliser is removed
    assert out["median_pool_sd"] == pytest.approx(0.3, abs=0.08)


def test_a_change_like_the_planted_organisms_gives_few_single_token_passes_but_a_set_that_stands_out(bench):
    # The demo's planted organism moved its words by a median +0.42 against a pool sd of 0.33: single words rarely
    # clear a 5-d.f. prediction t at 0.05/29, the 29 together do (here the tokens move independently, so the set's
    # spread over the pool is narrower than the demo pool's, whose common words move together).
    singles, sets = [], []
    for seed in range(20):
        out = bench.known_set_power(*_organisms(seed, raise_by=0.42))
        singles.append(out["bonferroni"])
        sets.append(out["set_p"] < 0.05)
    assert np.mean(singles) < 3 and np.mean(sets) >= 0.9, (singles, sets)


def test_on_nulls_single_tokens_and_the_set_keep_their_level(bench):
    family, sets = [], []
    for seed in range(40):
        out = bench.known_set_power(*_organisms(seed))
        family.append(out["bonferroni"] > 0)
        sets.append(out["set_p"] < 0.05)
    assert np.mean(family) <= 0.1 and np.mean(sets) <= 0.15, (np.mean(family), np.mean(sets))


def test_the_prediction_t_by_hand_and_bad_input(bench):
    organism, pool, known, tokens = _organisms(3, k=4, v=50, known=5, raise_by=1.0)
    organism[0] -= 8.0  # one known token lowered far below the pool: significant, but not a pass
    pool[:, 1] += 3.0  # one the pool raised more than the organism did: not "raised"
    out = bench.known_set_power(organism + 7.0, pool, known, tokens)  # a normaliser shift changes nothing
    o = organism - np.median(organism)
    c = pool - np.median(pool, axis=1, keepdims=True)
    t = [(o[j] - c[:, j].mean()) / (c[:, j].std(ddof=1) * np.sqrt(1 + 1 / 4)) for j in known]
    p = 2 * stats.t.sf(np.abs(t), 3)
    assert out["tokens"] == list(known) and out["t"] == pytest.approx(t) and out["p"] == pytest.approx(p)
    assert out["bonferroni"] == int(((p < 0.05 / 5) & (np.array(t) > 0)).sum())
    assert out["nominal"] == int(((p < 0.05) & (np.array(t) > 0)).sum()) < int((p < 0.05).sum())
    assert out["raised"] == int((np.array(t) > 0).sum()) == 3
    sm = c[:, known].mean(axis=1)
    expected = (o[known].mean() - sm.mean()) / (sm.std(ddof=1) * np.sqrt(1 + 1 / 4))
    assert out["set_t"] == pytest.approx(expected) and out["pool_set_means"] == pytest.approx(sm.tolist())
    assert out["set_p"] == pytest.approx(2 * stats.t.sf(abs(expected), 3))
    with pytest.raises(ValueError, match="needs >= 2 pool organisms"):
        bench.known_set_power(organism, pool[:1], known, tokens)
    with pytest.raises(ValueError, match="1 known token"):
        bench.known_set_power(organism, pool, [], tokens)
