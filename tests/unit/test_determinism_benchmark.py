"""benchmarks/determinism_under_load.py: its fingerprint sees a change, and its loading processes start and stop."""

from __future__ import annotations

import pytest
import torch

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("determinism_under_load")


def test_the_fingerprint_repeats_and_sees_one_changed_weight(bench, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    first = bench.fingerprint(model, rows=4, prompt_len=6, steps=3, seed=0)
    assert bench.fingerprint(model, rows=4, prompt_len=6, steps=3, seed=0) == first
    assert bench.fingerprint(model, rows=4, prompt_len=6, steps=3, seed=1) != first
    assert bench.fingerprint(model, rows=4, prompt_len=6, steps=2, seed=0) != first  # every step is hashed
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] += 1e-6  # a change in the last bits of one weight
    assert bench.fingerprint(model, rows=4, prompt_len=6, steps=3, seed=0) != first


def test_the_loading_processes_run_until_stopped_and_a_dead_one_is_an_error(bench, monkeypatch):
    hogs = bench.start_load(1, 1, 60)
    assert all(h.poll() is None for h in hogs)  # multiplying when start_load returns
    bench.stop_load(hogs)
    assert all(h.poll() is not None for h in hogs)
    monkeypatch.setattr(bench, "HOG", "import sys; sys.exit(3)")
    with pytest.raises(ValueError, match=r"exited before it multiplied \(exit code 3\)"):
        bench.start_load(2, 1, 60)
