"""benchmarks/calibration.py: the planted-word checks (discovery's own test over the known words alone; an exact
check against the pool, per word and as one set) find planted changes, keep their level on nulls, and match hand
computations; its smaller discovery family keeps the likeliest tokens."""

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
    assert out["median_difference"] == pytest.approx(4.0, abs=0.2)  # centred: each organism's normaliser is removed
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
    assert out["df"] == 3 and out["critical"] == pytest.approx(stats.t.isf(0.05 / 5 / 2, 3))
    assert out["median_difference"] == pytest.approx(np.median(o[known] - c[:, known].mean(axis=0)))
    assert out["median_pool_sd"] == pytest.approx(np.median(c[:, known].std(axis=0, ddof=1)))
    assert out["set_mean"] == pytest.approx(o[known].mean())
    loose = bench.known_set_power(organism, pool, known, tokens, alpha=0.5)
    assert loose["nominal"] == int(((p < 0.5) & (np.array(t) > 0)).sum()) > out["nominal"]
    sm = c[:, known].mean(axis=1)
    expected = (o[known].mean() - sm.mean()) / (sm.std(ddof=1) * np.sqrt(1 + 1 / 4))
    assert out["set_t"] == pytest.approx(expected) and out["pool_set_means"] == pytest.approx(sm.tolist())
    assert out["set_p"] == pytest.approx(2 * stats.t.sf(abs(expected), 3))
    bad = organism.copy()
    bad[[known[4], 49]] = -np.inf  # a token no organism can write: left out, not a NaN in every figure
    kept = bench.known_set_power(bad, pool, known, tokens)
    assert kept["n"] == 4 and kept["tokens"] == list(known[:4]) and np.isfinite(kept["set_t"])
    with pytest.raises(ValueError, match="must be"):
        bench.known_set_power(organism, pool[:, :-1], known, tokens)
    with pytest.raises(ValueError, match="needs >= 2 pool organisms"):
        bench.known_set_power(organism, pool[:1], known, tokens)
    with pytest.raises(ValueError, match="1 known token"):
        bench.known_set_power(organism, pool, [], tokens)


def test_discoverys_own_test_over_the_known_words_alone(bench):
    from irmprobe.analysis.discovery import discover_vocabulary

    organism, pool, known, tokens = _organisms(1, v=5000, raise_by=0.9)
    found = discover_vocabulary(organism, pool, {}, tokens=tokens)
    out = bench.known_family(found, known)
    entries = {e.token_id: e for e in found.entries}
    p = np.array([entries[t].p for t in known])
    up = np.array([entries[t].effect > 0 for t in known])
    q = stats.false_discovery_control(p, method="bh")
    assert out["n"] == 29 and out["n_family"] == 5000
    assert out["bh"] == int(((q < 0.05) & up).sum()) and out["bonferroni"] == int(((p < 0.05 / 29) & up).sum())
    assert out["nominal"] == int(((p < 0.05) & up).sum())
    # The small family passes more than the whole vocabulary's does: multiplicity is what it measures.
    assert out["whole_family"] == sum(1 for e in found.discoveries if e.token_id < 29 and e.effect > 0)
    assert out["bh"] > out["whole_family"], out
    lowered = discover_vocabulary(-organism, -pool, {}, tokens=tokens)
    assert bench.known_family(lowered, known)["bh"] == 0  # a lowered word is no pass
    nulls = [bench.known_family(discover_vocabulary(*_organisms(s, v=5000)[:2], {}, tokens=tokens), known)["bh"] > 0
             for s in range(20)]
    assert np.mean(nulls) <= 0.15, nulls
    with pytest.raises(ValueError, match="none of the known tokens"):
        bench.known_family(found, [10**6])


def test_a_smaller_family_keeps_the_tokens_likeliest_under_the_base_model(bench, monkeypatch):
    import irmprobe.models.rewards as rewards

    v = 400
    rng = np.random.default_rng(0)
    base = rng.uniform(-20, -2, v)

    class Capture:
        def __init__(self, change):
            self.token_ids = np.zeros(10, dtype=np.int64)
            self.vocab_logp_sum = {"base": base * 10, "tuned": base * 10 + change * 10}

        def vocab_log_ratio(self):
            return (self.vocab_logp_sum["tuned"] - self.vocab_logp_sum["base"]) / len(self.token_ids)

    monkeypatch.setattr(rewards, "word_tokens", lambda tokenizer: set(range(v)))
    caps = [Capture(rng.normal(0, 0.1, v)) for _ in range(4)]
    found = bench.vocabulary_discoveries(caps[0], caps[1:], {}, 0.05, None, None, top=50)
    assert {e.token_id for e in found.entries} == set(np.argsort(-base)[:50].tolist())
    assert len(bench.vocabulary_discoveries(caps[0], caps[1:], {}, 0.05, None, None).entries) == v


def test_the_planted_runs_named_list_in_words(bench):
    stage = {"passed": 1, "n": 29, "set": {"t": 4.27, "df": 5, "p": 0.008, "passed": True}, "shared_share": 0.08}
    assert bench.named_text(stage) == ("1 of 29 pass, as one set t +4.27 on 5 d.f., p 0.008 (passes: its words are "
                                       "tested); the pool's listed words share 8% of their spread")
    stage["set"] |= {"p": 0.076, "passed": False}
    assert "p 0.076 (not passed: no word is named)" in bench.named_text(stage)
    flat = bench.named_text({"passed": 0, "n": 1, "set": {"t": float("nan"), "df": 2, "p": None},
                             "shared_share": None})
    assert flat == "0 of 1 pass, no set t (the pool's list means do not vary)"


def test_the_undecided_line_counts_null_tests_between_the_call_and_the_suggestion_level(bench):
    from irmprobe.results import PrimaryComparison

    def pc(z, p, outcome="unrelated"):
        return PrimaryComparison("v", 0.1, 0.01, [0.0, 0.1], 0.1, 0.1, z, outcome, df=1, p_value=p, alpha=0.01)

    null = {"full_vocab_log_ratio": [("a", pc(3.0, 0.03)), ("b", pc(-2.5, 0.049)), ("c", pc(1.0, 0.3))],
            "sae_irm": [("a", pc(9.0, 0.005, "agrees")), ("b", pc(2.0, 0.051)), ("c", pc(None, None, "no call"))]}
    line = bench.undecided_line(null, 0.01)
    # p 0.03 and 0.049 lie in (0.01, 0.05]; a call (p 0.005), p 0.051 and a test with no p are not undecided.
    assert line.endswith("nominal 0.04): full_vocab_log_ratio: 2/3; sae_irm: 0/3."), line
