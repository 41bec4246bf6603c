"""The depth profile: per block, how much of the log-ratio the residual stream's change holds (direct path, logit
lens), read on planted models and planted rows."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from irmprobe.activations.readout import readout_rows
from irmprobe.analysis.depth import depth_profile, depth_text, r2_ci


def _pair_changed_at(model_dir, block: int):
    from irmprobe.models.loading import load_pair

    pair = load_pair(str(model_dir), None)
    tuned = copy.deepcopy(pair.base)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in tuned.model.layers[block].parameters():
            p.add_(0.3 * torch.randn_like(p))
    return pair, pair.base, tuned


def _streams(n=6, vocab=40):
    """Sequences of different lengths with prompts of different lengths (so right padding is exercised)."""
    rng = np.random.default_rng(0)
    lengths, prompts = rng.integers(6, 15, size=n), rng.integers(1, 5, size=n)
    return [tuple(int(t) for t in rng.integers(3, vocab, size=k)) for k in lengths], prompts


def test_the_logit_lens_after_the_last_block_is_the_log_ratio_and_nothing_changed_below_the_tuned_block(
        tiny_llama_dir):
    _, base, tuned = _pair_changed_at(tiny_llama_dir, 1)  # block 0 identical: no change after it
    ids, lens = _streams()
    rows = readout_rows(base, tuned, ids, lens, batch_size=4)
    assert len(rows["r"]) == sum(len(s) - p for s, p in zip(ids, lens))
    # r is the written token's log-ratio, read at the position before it.
    with torch.no_grad():
        seq = torch.tensor([ids[2]])
        lt, lb = (m(input_ids=seq).logits[0].log_softmax(-1) for m in (tuned, base))
    mine = rows["sequence"] == 2
    t = rows["position"][mine]
    expected = (lt[t - 1, seq[0, t]] - lb[t - 1, seq[0, t]]).double().numpy()
    np.testing.assert_allclose(rows["r"][mine], expected, atol=1e-5)
    assert np.abs(rows["r"]).max() > 1e-2
    np.testing.assert_allclose(rows["lens"][:, -1], rows["r"], atol=1e-4)  # the lens after the last block is r_t
    assert np.abs(rows["lens"][:, 0]).max() < 1e-6 and np.abs(rows["direct"][:, 0]).max() < 1e-6


def test_the_direct_path_is_the_change_read_through_the_written_tokens_centred_unembedding(tiny_llama_dir):
    from irmprobe.models.loading import readout

    _, base, tuned = _pair_changed_at(tiny_llama_dir, 0)
    ids, lens = _streams()
    rows = readout_rows(base, tuned, ids, lens, batch_size=3, lens=False)
    assert rows["lens"] is None
    unembed, gamma = readout(tuned)
    W = (unembed - unembed.mean(0)) * gamma
    with torch.no_grad():  # hidden_states[1]: the residual stream after block 0 (the last entry is normed)
        seq = torch.tensor([ids[4]])
        ht, hb = (m(input_ids=seq, output_hidden_states=True).hidden_states[1][0].numpy() for m in (tuned, base))
    mine = rows["sequence"] == 4
    t = rows["position"][mine]
    expected = np.einsum("nd,nd->n", W[np.array(ids[4])[t]], (ht - hb)[t - 1])
    np.testing.assert_allclose(rows["direct"][mine, 0], expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3


def test_readout_rows_refuses_what_it_cannot_read(tiny_llama_dir, tiny_neox_dir):
    from irmprobe.models.loading import load_pair

    _, base, tuned = _pair_changed_at(tiny_llama_dir, 0)
    with pytest.raises(ValueError, match="one written token"):
        readout_rows(base, tuned, [(5, 6, 7)], np.array([3]))
    import irmprobe.activations.readout as readout_module

    with pytest.MonkeyPatch.context() as mp:  # an architecture whose final norm is not known: no lens, say how
        mp.setattr(readout_module, "final_norm", lambda model: None)
        with pytest.raises(ValueError, match="depth.lens: false"):
            readout_rows(base, tuned, [(5, 6, 7)], np.array([1]))
        assert readout_rows(base, tuned, [(5, 6, 7)], np.array([1]), lens=False)["lens"] is None
    other = load_pair(str(tiny_neox_dir), None).base
    other.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="same number of blocks"):
        readout_rows(base, other, [(5, 6, 7)], np.array([1]))


def _planted_rows(n_prompts=40, per_prompt=30, blocks=4, planted=2, seed=0):
    """Rows whose log-ratio is 2 z plus prompt-level and row noise, where z is written at block ``planted`` and
    carried by every block after it (as a residual stream carries it); the blocks before it read noise."""
    rng = np.random.default_rng(seed)
    units = np.repeat(np.arange(n_prompts), per_prompt)
    z = rng.normal(size=len(units))
    X = rng.normal(size=(len(units), blocks))
    X[:, planted:] = z[:, None] + 0.05 * X[:, planted:]
    y = 2.0 * z + rng.normal(size=n_prompts)[units] * 0.3 + rng.normal(size=len(units)) * 0.5
    return {"r": y, "direct": X, "lens": None}, units


def test_the_profile_finds_the_block_whose_reading_holds_the_log_ratio():
    rows, units = _planted_rows()
    folds = (np.flatnonzero(units % 2 == 0), np.flatnonzero(units % 2 == 1))
    profile = depth_profile(rows, units, folds, seed=1)
    r2 = profile["direct"]["r2"]
    assert min(r2[2:]) > 0.8 and max(abs(v) for v in r2[:2]) < 0.05
    assert profile["direct"]["first_reaching"] == 2 and "lens" not in profile
    low, high = profile["direct"]["ci"][2]
    assert low < r2[2] < high and high - low < 0.1
    assert profile["n_prompts"] == 40 and profile["n_rows"] == 1200
    line = depth_text(profile, [0, 1])
    assert line.startswith("read one block at a time, the residual stream's change after block(s) 0, 1 explains "
                           "R^2 -0.0") and "of r_t at best through its direct path (" in line
    assert line.endswith("the direct path reaches 0.3 from block 2 on (of blocks 0-3)")
    # "From block N on": a block that reaches the target is not named when a later one falls below it.
    rows["direct"][:, 3] = np.random.default_rng(5).normal(size=len(units))
    assert depth_profile(rows, units, folds, seed=1)["direct"]["first_reaching"] is None
    with pytest.raises(ValueError, match="share a prompt"):
        depth_profile(rows, units, (np.arange(600), np.arange(590, 1200)))


def test_the_r2_interval_resamples_prompts_not_rows():
    """Each row repeated 10 times within its prompt adds no information: resampling prompts gives the same
    interval; resampling rows would narrow it about threefold."""
    rng = np.random.default_rng(2)
    units = np.repeat(np.arange(30), 5)
    y = rng.normal(size=len(units))
    p = 0.6 * y + rng.normal(size=len(units)) * 0.8
    once = r2_ci(y, p, units, seed=0)
    ten = r2_ci(np.repeat(y, 10), np.repeat(p, 10), np.repeat(units, 10), seed=0)
    np.testing.assert_allclose(ten, once)  # the same draws of prompts: the very same interval
    assert r2_ci(y[:5], p[:5], np.zeros(5)) == [None, None]


def test_the_verdict_line_gives_the_decision_view_fit_and_where_the_log_ratio_becomes_readable():
    from irmprobe.analysis.verdict import decision_line

    rows, units = _planted_rows()
    folds = (np.flatnonzero(units % 2 == 0), np.flatnonzero(units % 2 == 1))
    depth = depth_profile(rows, units, folds) | {"n_layers": 4}
    m = SimpleNamespace(irm={"fits": {"sae_irm_bilinear": {"test_r2": 0.012}}}, depth=depth,
                        capture={"layers": [0, 1]}, attribution=None)
    line = decision_line(m)
    assert line.startswith("decision-side IRM (bilinear view): out-of-fold R^2 +0.01 of r_t; read one block at a "
                           "time, the residual stream's change after block(s) 0, 1 explains R^2")
    assert "the direct path reaches 0.3 from block 2 on (of blocks 0-3)" in line
    assert decision_line(SimpleNamespace(irm={"fits": {}}, depth={"skipped": "off"}, capture={},
                                         attribution=None)) is None
    # With dictionaries of the change, the attribute stage's view on them follows the fit stage's.
    view = {"test_r2": 0.382, "alpha": 10.0, "tau": 0.41, "n_tokens": 120, "n_rows": 9000,
            "top": [{"node": "L29/f7", "weight": 0.9}, {"node": "L28/f3", "weight": 0.5}]}
    m.attribution = {"dictionary": "change", "decision_view": view}
    assert decision_line(m).startswith(
        "decision-side IRM (bilinear view): out-of-fold R^2 +0.01 of r_t; on the dictionaries of the change (the "
        "attribute stage's; the same prompt folds): out-of-fold R^2 +0.38, tau +0.41 against the RM (120 tokens), "
        "its top features L29/f7, L28/f3; read one block at a time")
    # Its shuffled-target refits, where the record has them, stand beside its R^2.
    view["shuffled"] = {"test_r2": [-0.004, 0.001, None], "tau": [0.02, -0.05, None]}
    assert "tau +0.41 against the RM (120 tokens) (shuffled targets, 3 refits, 1 identically zero: R^2 -0.00 to " \
        "+0.00, tau -0.05 to +0.02), its top features" in decision_line(m)
    alone = SimpleNamespace(irm={"fits": {}}, depth=None, capture={}, attribution={"decision_view": view})
    assert decision_line(alone).startswith("decision-side IRM (the fit stage's): not fitted; on the dictionaries of "
                                           "the change")


def test_the_report_shows_the_profile_per_block_with_the_captured_blocks_marked():
    from irmprobe.reporting.interactive import depth_profile as plot
    from irmprobe.reporting.summary import depth_section
    from irmprobe.reporting.tracking import headline_scalars, wandb_tables

    rows, units = _planted_rows()
    rows["lens"] = rows["direct"][:, [0, 2, 3, 3]]  # the lens reads the planted change from block 1 on
    folds = (np.flatnonzero(units % 2 == 0), np.flatnonzero(units % 2 == 1))
    metrics = {"depth": depth_profile(rows, units, folds) | {"n_layers": 4}, "capture": {"layers": [0, 1]}}
    lines = depth_section(metrics["depth"], [0, 1])
    assert len(lines) == 2 + 4 and lines[3].startswith("    1*") and lines[4].startswith("    2 ")
    assert float(lines[4].split()[1]) > 0.8 and float(lines[3].split()[1]) < 0.05 < 0.8 < float(lines[3].split()[3])
    fig = plot(metrics)
    assert [t.name.split(" ")[0] for t in fig.data] == ["direct", "logit"]
    assert fig.data[0].y[2] == metrics["depth"]["direct"]["r2"][2]
    head = headline_scalars(metrics)
    assert head["depth/direct_first_reaching"] == 2 and head["depth/lens_first_reaching"] == 1
    assert head["depth/direct_r2_captured"] < 0.05 and head["depth/lens_r2_captured"] > 0.8
    cols, table = wandb_tables(metrics | {"agreement": [], "tokens": {"rows": [], "columns": []}}, [])["depth profile"]
    assert cols[:2] == ["block", "direct_r2"] and len(table) == 4 and table[1][4] > 0.8 > table[1][1]  # block 1
    assert depth_section({"skipped": "depth.enabled is off"}, []) == ["== depth: skipped (depth.enabled is off) =="]
    assert plot({"depth": {"skipped": "off"}}) is None


def test_a_log_ratio_that_never_moves_has_no_r2_and_the_stage_still_reports():
    """A tuned model equal to its base: every r_t is 0, no R^2 is defined, nothing reaches the target, and the
    stage's progress line and the verdict clause say so instead of failing."""
    from irmprobe.pipeline.stages.depth import DepthStage

    units = np.repeat(np.arange(8), 5)
    rows = {"r": np.zeros(40), "direct": np.random.default_rng(0).normal(size=(40, 2)), "lens": np.zeros((40, 2))}
    folds = (np.flatnonzero(units < 4), np.flatnonzero(units >= 4))
    profile = depth_profile(rows, units, folds) | {"n_layers": 2}
    assert profile["direct"]["first_reaching"] is None and profile["lens"]["r2"] == [None, None]
    assert "last block undefined" in DepthStage().summary(profile)
    assert depth_text(profile, [1]).endswith("block(s) 1: no R^2 is defined (r_t does not vary on the held-out "
                                             "prompts)")
    profile["lens"]["r2"] = [0.1, 0.2]
    assert "the logit lens reaches 0.3 at no block" in depth_text(profile, [1])
