"""benchmarks/named_words_null.py: its "built" rule is the discover stage's per-word calibration, and a like-for-like
null (the organism against K - 1 controls) costs power where the draws are normal."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("named_words_null")


def test_the_built_rule_is_the_stages_calibration_and_gate(bench):
    from irmprobe.analysis.discovery import named_vocabulary

    for noise in ("normal", "heavy"):
        x, logp = bench.organisms(3, 4, noise, 6.0)
        ps, gate = bench.p_values(x, logp)
        stage = named_vocabulary(x[0], x[1:], range(bench.LISTED), {}, strata=logp)
        assert [e["token_id"] for e in stage["entries"]] == list(range(bench.LISTED))
        np.testing.assert_allclose(ps["built"], [e["p"] for e in stage["entries"]], rtol=1e-12)
        assert gate == stage["set"]["passed"]


def test_with_normal_draws_dropping_a_control_names_fewer_raised_words(bench):
    out = bench.simulate(4, 8, "normal", 6.0)
    assert out["built"]["true_named"] >= out["drop_one"]["true_named"] + 1.0, out
    assert out["twice_mean"]["true_named"] <= out["drop_one"]["true_named"], out
    assert out["built"]["true_named"] >= 2.0 and set(out) == set(bench.RULES)
