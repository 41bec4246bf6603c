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
    acts = {f"{m}.{b}": rng.standard_normal((50, 8)).astype(np.float32) for m in ("base", "tuned") for b in (0, 3)}
    saes = {(m, b): _sae(hash((m, b)) % 100) for m in ("base", "tuned") for b in (0, 3)}
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


def _prompted(n_prompts=24, n_seq=4, prompt_len=4, gen_len=6, d=6, seed=0):
    """Samples and a capture whose sequences continue shared prompts: prompt rows are copies in every sequence
    of their prompt; the log-ratio of a generated row is a planted function of its features."""
    from irmprobe.activations.capture import Capture
    from irmprobe.activations.samples import Samples

    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    vocab = np.arange(10, 40)
    ids, seqs, pos, acts, tokens, lens, index = [], [], [], [], [], [], []
    for p in range(n_prompts):
        prompt = rng.choice(vocab, prompt_len)
        prompt_acts = rng.random((prompt_len, d))
        for s in range(n_seq):
            gen = rng.choice(vocab, gen_len)
            seq = len(tokens)
            tokens.append(tuple(int(t) for t in np.r_[prompt, gen]))
            lens.append(prompt_len)
            index.append(p)
            for t in range(1, prompt_len + gen_len):
                ids.append(tokens[-1][t])
                seqs.append(seq)
                pos.append(t)
                acts.append(prompt_acts[t] if t < prompt_len else rng.random(d) + 0.2 * (tokens[-1][t] % 3))
    acts = np.array(acts, dtype=np.float32)
    y = acts @ w
    samples = Samples(tuple(f"p{i}" for i in range(n_prompts)), tuple(tokens), np.array(lens), np.array(index),
                      np.array(["base", "tuned"] * (len(tokens) // 2)), tuple("" for _ in tokens),
                      rng.standard_normal(len(tokens)))
    capture = Capture((0,), "hook_mlp_out", np.array(ids), np.array(seqs), np.array(pos),
                      np.zeros(len(ids), np.float32), y.astype(np.float32), {"tuned.0": acts, "base.0": acts})
    return samples, capture, acts


def test_views_fold_by_prompt_and_never_score_prompt_rows():
    from irmprobe.activations.samples import in_prompt, row_prompts
    from irmprobe.analysis.views import analyse, prompt_folds
    from irmprobe.config import CompareConfig, IRMConfig

    samples, capture, acts = _prompted()
    units = row_prompts(samples, capture.seq_index)
    assert np.array_equal(units, samples.prompt_index[capture.seq_index])
    _, (a, b) = prompt_folds(capture, samples, 0)
    assert not set(units[a]) & set(units[b])  # every sequence of a prompt on one side
    prompt_rows = in_prompt(samples, capture.seq_index, capture.position)
    assert prompt_rows.sum() == 24 * 4 * 3
    rm = {t: float(t % 5 - 2) for t in range(10, 40)}
    ic = IRMConfig(estimators=("ridge",), n_shuffles=1, positions=("reader",), min_token_count=1)
    analysis = analyse(capture, acts.astype(np.float64), samples, rm, ic, CompareConfig(rm_informed=False, n_bootstrap=50),
                       seed=0)
    assert not prompt_rows[analysis.eval_rows].any()
    assert len(analysis.eval_rows) == (~prompt_rows).sum()
    fit = analysis.fits["sae_irm"]
    rows = analysis.eval_rows
    y = capture.log_ratio
    r2 = 1 - np.sum((y[rows] - fit.predictions[rows]) ** 2) / np.sum((y[rows] - y[rows].mean()) ** 2)
    assert fit.test_r2 == pytest.approx(r2) and fit.test_r2 > 0.9  # scored on generated rows only
    row = next(r for r in analysis.rows if r["name"] == "sae_irm")
    assert row["ci_method"] == "prompt cluster bootstrap" and row["tau_ci"][0] < row["tau"] < row["tau_ci"][1]


def test_sae_evaluation_rows_hold_out_whole_prompts():
    from irmprobe.activations.samples import row_prompts
    from irmprobe.pipeline.stages.saes import evaluation_rows

    samples, capture, _ = _prompted(n_prompts=30)
    units = row_prompts(samples, capture.seq_index)
    held = evaluation_rows(units, seed=0)
    assert set(units[held]).isdisjoint(units[~held]) and len(set(units[held])) == 3
    assert np.array_equal(held, evaluation_rows(units, seed=0))
    with pytest.raises(ValueError, match="fewer than 2 prompts"):
        evaluation_rows(np.zeros(10, dtype=int), seed=0)


def _bilinear_case(seed=0, n=3000, m=40, d=16, vocab=60):
    """Features at t-1 and a written token; r_t = sum_c w_c f_c g_c(x_t): a bilinear form of state and token."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    F = sp.random(n, m, density=0.15, random_state=seed, data_rvs=lambda k: rng.exponential(1.0, k)).tocsr()
    tokens = rng.integers(0, vocab, n)
    W, D = rng.normal(size=(vocab, d)), rng.normal(size=(m, d))
    w = np.zeros(m)
    w[:5] = [2.0, -1.5, 1.0, 1.0, -0.5]
    Wc = W - W.mean(0)
    g = np.einsum("nd,md->nm", Wc[tokens], D)
    y = np.asarray(F.multiply(g) @ w).ravel()
    y = y + rng.normal(scale=0.3 * y.std(), size=n)
    groups = np.arange(n) // 10  # prompts of 10 rows each
    return F, tokens, W, D, y, groups


def test_bilinear_decision_view_fits_what_a_state_only_view_cannot():
    from irmprobe.analysis.views import bilinear_inputs
    from irmprobe.irm.crossfit import cross_fit_irm, two_folds

    F, tokens, W, D, y, groups = _bilinear_case()
    folds = two_folds(groups, 0)
    Z = bilinear_inputs(F, tokens, D, W)
    bilinear = cross_fit_irm("bilinear", Z, y, groups, folds=folds, alphas=(0.1, 1.0, 10.0))
    state = cross_fit_irm("state", F, y, groups, folds=folds, alphas=(0.1, 1.0, 10.0))
    assert bilinear.test_r2 >= 0.8
    assert state.test_r2 <= 0.1
    # The written token, not its neighbour: shifting the tokens by one row breaks the fit.
    shifted = cross_fit_irm("shifted", bilinear_inputs(F, np.roll(tokens, 1), D, W), y, groups, folds=folds,
                            alphas=(0.1, 1.0, 10.0))
    assert shifted.test_r2 <= 0.1
    # Dense (raw) inputs give the same design as sparse ones; the final norm's weight scales each direction.
    dense = bilinear_inputs(F.toarray(), tokens, D, W, gamma=np.full(D.shape[1], 2.0))
    np.testing.assert_allclose(dense, 2.0 * Z.toarray(), rtol=1e-4, atol=1e-4)  # float32 products
    with pytest.raises(ValueError, match="shapes do not match"):
        bilinear_inputs(F, tokens[:-1], D, W)
