"""benchmarks/naming_calibration.py: its planted feature carries what it says, and the stage's measures name it where
it carries the threshold's share and not where it carries less."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("naming_calibration")


@pytest.fixture(scope="module")
def setup(bench):
    from irmprobe.prompts import load_prompts

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, _, ids = bench.planted_setup(Path(tmp))
    return tokenizer, ids, load_prompts()


def _mlp_out(model, layer, x):
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_only_the_planted_feature_reads_the_change_and_by_context(bench, setup):
    tokenizer, ids, prompts = setup
    base, tuned, sae = bench.naming_case(tokenizer, ids, 2, 0.03, 1.0, prompts[:24])
    x = torch.tensor([tokenizer(prompts[30] + " " + prompts[31])["input_ids"]])
    xb, xt = _mlp_out(base, bench.LAYER, x), _mlp_out(tuned, bench.LAYER, x)
    u = sae.W_dec[0].detach()
    assert torch.allclose(xb @ u, torch.zeros(len(xb)), atol=1e-6)  # the base writes nothing along u
    torch.testing.assert_close(xt - xb, (0.03 * u).expand_as(xb), atol=1e-6, rtol=0)
    with torch.no_grad():
        fb, ft = sae.encode(xb), sae.encode(xt)
    torch.testing.assert_close(fb[:, 1:], ft[:, 1:])  # the random features read nothing of the change
    gained = ft[:, 0] - fb[:, 0]
    assert (gained >= -1e-7).all() and (gained <= 0.03 + 1e-6).all()
    assert gained.max() > 0.025 and gained.min() < 0.015  # the whole change in some contexts, less in others


def test_the_planted_feature_is_named_where_it_carries_enough_and_not_where_it_carries_less(bench, setup):
    tokenizer, ids, prompts = setup
    strong = bench.replicate(tokenizer, ids, prompts[:24], prompts[24:60], 0, 1.2, 0.03, 0.6)
    weak = bench.replicate(tokenizer, ids, prompts[:24], prompts[24:60], 0, 0.6, 0.03, 0.6)
    assert strong["first_is_planted"] and weak["first_is_planted"]
    assert strong["true"] > 0.7 and strong["named"] == 1 and strong["named_planted"]
    assert weak["true"] < 0.5 and weak["named"] is None
    for r in (strong, weak):
        assert abs(r["estimate"] - r["true"]) < 0.1 and r["ci"][0] <= r["estimate"] <= r["ci"][1]
    assert np.isfinite(strong["true"])
