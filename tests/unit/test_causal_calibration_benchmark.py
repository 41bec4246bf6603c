"""benchmarks/causal_calibration.py: its planted models carry what it says, its sets are what it says, and one
replicate through the stage's sampling and rule calls the planted sets causal and the null sets not."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("causal_calibration")


@pytest.fixture(scope="module")
def tokenizer(bench):
    with tempfile.TemporaryDirectory() as tmp:
        return bench.small_tokenizer(Path(tmp))


def test_the_tuned_model_and_the_planted_feature_write_what_the_case_says(bench, tokenizer):
    words, ids = bench.planted_words(tokenizer)
    assert len(words) == 5 and all(tokenizer.decode([i]) == " " + w for w, i in zip(words, ids))
    base, tuned, sae = bench.planted_case(tokenizer, ids, seed=3, strength=0.03, carried=0.2, feature_scale=0.05)
    x = torch.tensor([tokenizer("The train left the station")["input_ids"]])
    outs = {}
    for name, model in (("base", base), ("tuned", tuned)):
        seen = []
        handle = model.model.layers[bench.LAYER].mlp.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            model(x)
        handle.remove()
        outs[name] = seen[0][0]
    u = sae.W_dec[0].detach()
    assert torch.isclose(u.norm(), torch.tensor(1.0))
    # Block LAYER's MLP output differs by exactly strength x u at every position (the rest of the block is the
    # base's, and nothing upstream changed).
    torch.testing.assert_close(outs["tuned"] - outs["base"], (0.03 * u).expand_as(outs["base"]), atol=1e-6, rtol=0)
    with torch.no_grad():
        acts = sae.encode(outs["tuned"])
    assert torch.allclose(acts[:, 0], torch.tensor(0.2 * 0.03))  # the planted feature writes carried x strength x u
    assert (acts[:, 1:] > 0).any()  # the random features fire
    # The planted words' unembedding rows lie mostly along u.
    rows = tuned.lm_head.weight[ids].detach()
    assert (torch.nn.functional.cosine_similarity(rows, u.expand_as(rows)) > 0.9).all()


def test_the_design_keeps_the_planted_feature_in_the_planted_sets_only(bench):
    sets, targeted = bench.design(seed=5)
    by = {fs.name: set(fs.features[bench.LAYER]) for fs in sets}
    assert targeted == bench.TARGETED and [fs.name for fs in sets[:4]] == list(targeted)
    assert 0 in by["planted_10"] and 0 in by["planted_6"] and len(by["planted_10"]) == 10 and len(by["planted_6"]) == 6
    assert 0 not in by["null_10"] | by["null_6"] and len(by["null_10"]) == 10 and len(by["null_6"]) == 6
    randoms = [name for name in by if name.startswith("random_")]
    assert sorted(len(by[n]) for n in randoms) == [6] * 4 + [10] * 4
    # The null and random sets come from one pool, the features no planted set holds: exchangeable draws.
    planted = by["planted_10"] | by["planted_6"]
    assert all(not by[n] & planted for n in randoms + ["null_10", "null_6"])
    # Random sets are not kept apart from the null sets (as they would be if drawn from what the null sets left).
    def shared(seed):
        sets = {fs.name: set(fs.features[bench.LAYER]) for fs in bench.design(seed)[0]}
        nulls = sets["null_10"] | sets["null_6"]
        return any(sets[n] & nulls for n in sets if n.startswith("random_"))

    assert sum(shared(seed) for seed in range(20)) >= 15


def test_the_prediction_bound_is_the_t_prediction_interval_and_needs_three_shares(bench):
    from scipy.stats import t

    shares = [0.0, 0.1, 0.2, 0.1]
    expected = 0.1 + t.ppf(1 - 0.05 / 8, 3) * np.std(shares, ddof=1) * np.sqrt(1 + 1 / 4)
    assert bench.prediction_bound(shares, 4) == pytest.approx(expected)
    assert bench.prediction_bound(shares, 1) < bench.prediction_bound(shares, 4)  # Bonferroni widens it
    assert bench.prediction_bound([0.0, 0.1], 4) is None


def test_one_replicate_calls_the_planted_sets_causal_and_the_null_sets_not(bench, tokenizer):
    from irmprobe.prompts import load_prompts

    words, ids = bench.planted_words(tokenizer)
    args = argparse.Namespace(strength=0.03, carried=[1.0], scale=0.05)
    out = bench.replicate(tokenizer, ids, words, load_prompts()[:80], 0, args)
    assert out["positive"] and out["carried"] == 1.0
    assert out["share"]["planted_10"] > 0.8 and out["share"]["planted_6"] > 0.8
    assert abs(out["share"]["null_10"]) < 0.3 and abs(out["share"]["null_6"]) < 0.3
    assert out["stage"] == {"planted_10": True, "planted_6": True, "null_10": False, "null_6": False}
    assert len(out["known_nulls"]) == 8 and not any(out["known_nulls"])
    assert np.isfinite(out["random_sd"])
