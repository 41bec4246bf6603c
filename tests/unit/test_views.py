import numpy as np
import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from irmprobe.analysis.views import probe_inputs


def _sae(seed, d_in=8, d_sae=12):
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in))
        sae.b_dec.zero_()
    return sae


def test_probe_inputs_each_kind():
    rng = np.random.default_rng(0)
    acts = {f"{m}.{l}": rng.standard_normal((50, 8)).astype(np.float32) for m in ("base", "tuned") for l in (0, 3)}
    saes = {(m, l): _sae(hash((m, l)) % 100) for m in ("base", "tuned") for l in (0, 3)}
    raw, names = probe_inputs("raw", acts, saes, (0, 3))
    assert raw.shape == (50, 16) and np.allclose(raw[:, 8:], acts["tuned.3"]) and names[8] == "L3/dim0"
    tuned, names = probe_inputs("tuned", acts, saes, (0, 3))
    assert tuned.shape == (50, 24) and names[12] == "L3/tuned0"
    with torch.no_grad():
        expected = saes["tuned", 3].encode(torch.from_numpy(acts["tuned.3"])).numpy()
    assert np.allclose(tuned[:, 12:].toarray(), expected, atol=1e-5)  # each model's own SAE on its own activations
    base, _ = probe_inputs("base", acts, saes, (0, 3))
    with torch.no_grad():
        expected = saes["base", 0].encode(torch.from_numpy(acts["base.0"])).numpy()
    assert np.allclose(base[:, :12].toarray(), expected, atol=1e-5)


def test_diff_inputs_match_features_one_to_one():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 8)).astype(np.float32)
    sae = _sae(3)
    # The base dictionary is the tuned one with its features permuted: matched, the difference is 0.
    perm = np.random.default_rng(2).permutation(12)
    base = _sae(3)
    with torch.no_grad():
        base.W_enc.copy_(sae.W_enc[:, perm])
        base.b_enc.copy_(sae.b_enc[perm])
        base.W_dec.copy_(sae.W_dec[perm])
    diff, names = probe_inputs("diff", {"tuned.0": a, "base.0": a}, {("tuned", 0): sae, ("base", 0): base}, (0,))
    assert np.allclose(diff.toarray(), 0, atol=1e-5) and names[0] == "L0/diff0"
    with pytest.raises(ValueError, match="inputs must be"):
        probe_inputs("logits", {"tuned.0": a}, {("tuned", 0): sae}, (0,))
