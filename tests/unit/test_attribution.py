"""Attribution of the implicit reward to SAE features, on tiny Llamas whose tuned copy writes known directions.

Block L's MLP of the tuned model adds ``sum_k c_k d_k`` at every position. The SAE at L has one feature per
planted direction (encoders biorthogonal to the planted decoders, so each reads exactly its own ``c_k``) and
random features that read nothing planted; a direction no feature reads lands in the error term. A direction's
effect on the implicit reward is its component along ``u``, the direction that raises the planted words.
"""

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from irmprobe.validation.attribution import (
    ERROR,
    ImplicitReward,
    Node,
    attribution_curves,
    exact_check,
    hook_point_bounds,
    node_setter,
    ranked_nodes,
    smallest_faithful,
)

WORDS = "good great love happy nice best wonderful".split()
L = 2
D_SAE = 24


def _planted(planted_llama, features, error=None, seed=0, enc_scale=30.0, block=L):
    """(tokenizer, base, tuned, SAE at block L, planted ids, feature indices).

    ``features``: (u-component, strength) per planted feature; ``error``: the same for a direction in the error.
    ``enc_scale``: the random features' encoder scale (30: they fire at about the planted features' scale).
    """
    tok, base, u, ids = planted_llama(WORDS)
    base = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    n = len(features) + (error is not None)
    q = torch.linalg.qr(torch.cat([u[:, None], torch.randn(32, n, generator=g)], 1))[0]  # q[:, 0] = +-u
    q[:, 0] = u
    dirs = [a * q[:, 0] + q[:, k + 1] for k, (a, _) in enumerate(features + ([error] if error else []))]
    dirs = [d / d.norm() for d in dirs]
    P = q @ q.T  # the planted subspace: the base's block-L MLP writes nothing in it
    with torch.no_grad():
        base.model.layers[block].mlp.down_proj.weight.copy_((torch.eye(32) - P) @
                                                            base.model.layers[block].mlp.down_proj.weight)
    tuned = copy.deepcopy(base)
    strengths = [c for _, c in features] + ([error[1]] if error else [])
    with torch.no_grad():
        tuned.model.layers[block].mlp.down_proj.bias += sum(c * d for c, d in zip(strengths, dirs))
    planted_idx = list(range(3, 3 + len(features)))
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=D_SAE))
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        W = torch.randn(D_SAE, 32, generator=g)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        enc = torch.randn(32, D_SAE, generator=g) * enc_scale
        sae.W_enc.copy_((torch.eye(32) - P) @ enc)  # random features read nothing planted
        D = torch.stack(dirs, 1)  # [32, n]: the planted decoders (and the error's direction)
        dual = torch.linalg.pinv(D)  # [n, 32]: dual[k] . dirs[l] = delta_kl
        for k, i in enumerate(planted_idx):
            sae.W_dec[i] = dirs[k]
            sae.W_enc[:, i] = dual[k]
    return tok, base, tuned, sae, ids, planted_idx


def _metric(tok, base, tuned, sae, ids, n_prompts=12, seed=0, change=False):
    """The metric on :func:`_sequences`."""
    return ImplicitReward(base.eval(), tuned.eval(), {L: sae}, "mlp_out", *_sequences(tok, ids, n_prompts, seed),
                          batch_size=8, change=change)


def _sequences(tok, ids, n_prompts=12, seed=0):
    """Sequences whose tuned continuations use the planted words and base continuations do not:
    (sequences, prompt lengths, prompts, sources)."""
    rng = np.random.default_rng(seed)
    vocab = len(tok)
    others = np.setdiff1d(np.arange(1, vocab), ids)
    seqs, lens, prompt, source = [], [], [], []
    for p in range(n_prompts):
        head = rng.choice(others, 6).tolist()
        for s in ("tuned", "tuned", "base", "base"):
            pool = np.array(ids) if s == "tuned" else others
            tail = [int(rng.choice(pool)) if rng.random() < 0.6 else int(rng.choice(others)) for _ in range(8)]
            seqs.append(head + tail)
            lens.append(len(head))
            prompt.append(p)
            source.append(s)
    return seqs, lens, prompt, source


@pytest.fixture(scope="module")
def single(planted_llama):
    """One reward feature (along u) and a louder feature orthogonal to u (it moves the final norm only)."""
    tok, base, tuned, sae, ids, (j, loud) = _planted(planted_llama, [(1.0, 0.04), (0.0, 0.06)])
    return {"metric": _metric(tok, base, tuned, sae, ids), "j": j, "loud": loud, "sae": sae,
            "parts": (tok, base, tuned, sae, ids)}


def test_attribution_ranks_the_planted_feature_first_and_it_alone_is_faithful(single):
    metric, j = single["metric"], single["j"]
    full, empty = metric.evaluate(None), metric.evaluate(lambda layer, part: False)
    assert full.mean() > 1.0 and abs(empty.mean()) < 0.05 * full.mean()  # the change lives at block L
    attribution = metric.integrated_gradients(steps=8)
    ranked = ranked_nodes(attribution)
    assert ranked[0][0] == Node(L, j)
    # IG's completeness: the attributions sum to about m(M) - m(empty).
    total = sum(a for _, a in ranked)
    assert total == pytest.approx(full.mean() - empty.mean(), rel=0.05)
    others = [a for node, a in ranked if node != Node(L, j)]
    # The louder feature (1.5 times the change) acts only through the final norm: a small share.
    assert max(abs(a) for a in others) < 0.15 * ranked[0][1]
    curves = attribution_curves(metric, ranked, [1, 2, 5], n_random=4, seed=0,
                                candidates=[Node(L, i) for i in range(D_SAE) if i != j])
    first = curves["rows"][0]
    assert first["k"] == 1 and first["faithfulness"]["value"] >= 0.9
    assert first["completeness"]["value"] <= 0.1
    lo, hi = first["faithfulness"]["ci"]
    assert lo <= first["faithfulness"]["value"] <= hi
    assert max(abs(v) for v in first["random"]["values"]) < 0.1  # random features carry nothing
    assert abs(curves["errors_only"]["value"]) < 0.1  # nothing planted in the error term
    assert curves["bound"]["value"] > 0.95
    assert smallest_faithful(curves, 0.6) == 1
    # Features alone (the error at its base value) carry it too: nothing was planted in the error.
    assert curves["feature_rows"][0]["faithfulness"]["value"] >= 0.9
    assert smallest_faithful(curves, 0.6, "feature_rows") == 1
    # The naming rule on the random sets (a known null): none of the 12 reaches 60%.
    from irmprobe.analysis.verdict import null_named

    null = null_named({"curves": curves, "threshold": 0.6})
    assert null["reached"] == 0 and null["n"] == 12 and null["highest"] < 0.1


def test_a_dictionary_of_the_change_finds_what_the_activations_dictionary_leaves_in_its_error(single):
    """The planted change at block L lies in directions no feature of the activations' dictionary reads (its
    planted encoders zeroed), so there it all lands in the error term; a dictionary of the change whose feature j
    reads the planted direction off x_tuned - x_base carries it in one feature."""
    tok, base, tuned, sae, ids = single["parts"]
    j = single["j"]
    blind = copy.deepcopy(sae)
    with torch.no_grad():
        blind.W_enc[:, [j, single["loud"]]] = 0.0
    acts_metric = _metric(tok, base, tuned, blind, ids)
    change_metric = _metric(tok, base, tuned, sae, ids, change=True)
    # Either way, every node tuned is the tuned model and none tuned is the base at the hook point, also for a
    # change dictionary with biases (its zero-change node values are then not zero).
    biased = copy.deepcopy(sae)
    with torch.no_grad():
        biased.b_dec.copy_(torch.linspace(-0.5, 0.5, 32))
        biased.b_enc.fill_(0.1)
    for part in (None, lambda layer, part: False):
        for metric in (change_metric, _metric(tok, base, tuned, biased, ids, change=True)):
            np.testing.assert_allclose(metric.evaluate(part), acts_metric.evaluate(part), atol=1e-3, rtol=1e-3)
    feats = [Node(L, i) for i in range(D_SAE)]
    curves = {}
    for name, metric in (("activations", acts_metric), ("change", change_metric)):
        ranked = ranked_nodes(metric.integrated_gradients(steps=4))
        curves[name] = attribution_curves(metric, ranked, [1], n_random=2, seed=0, candidates=feats)
        if name == "change":
            assert ranked[0][0] == Node(L, j)
    assert curves["activations"]["errors_only"]["value"] >= 0.9
    assert curves["activations"]["feature_rows"][0]["faithfulness"]["value"] <= 0.1
    assert curves["activations"]["features_all"]["value"] <= 0.1  # no feature of it carries anything
    assert curves["change"]["errors_only"]["value"] <= 0.1
    assert curves["change"]["feature_rows"][0]["faithfulness"]["value"] >= 0.9
    assert curves["change"]["features_all"]["value"] >= 0.9


def test_change_dictionaries_are_trained_on_the_change_and_cached(tmp_path, monkeypatch):
    """The attribute stage's dictionaries of the change: trained on x_tuned - x_base (a sparse planted change on
    top of dense activations both models share), measured on held-out prompts, cached by the capture's key."""
    from types import SimpleNamespace

    from irmprobe.config import RunConfig
    from irmprobe.pipeline.stages.attribute import change_dictionaries
    from irmprobe.saes.evaluate import decoder_directions

    monkeypatch.setenv("IRMPROBE_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    n, d = 2400, 16
    shared = rng.normal(size=(n, d)).astype(np.float32) * 5.0  # what both models compute: no part of the change
    atoms = np.eye(d, dtype=np.float32)[:4]
    change = (rng.random((n, 4)) < 0.2) * rng.uniform(1, 2, (n, 4)) @ atoms
    capture = SimpleNamespace(acts={"base.3": shared, "tuned.3": shared + change.astype(np.float32)},
                              seq_index=np.arange(n) // 20, hook="hook_mlp_out",
                              hook_name=lambda layer: f"blocks.{layer}.hook_mlp_out")
    samples = SimpleNamespace(prompt_index=np.arange(n // 20) // 3, token_ids=[()] * (n // 20), prompts=["p"] * 40)
    cfg = RunConfig.from_dict({"sae": {"expansion": 1, "batch_size": 128, "lr": 1e-2},
                               "attribute": {"dictionary": "change", "change_training_samples": 20000,
                                             "change_architecture": "standard", "change_l1_coefficient": 0.3}})
    saes, rows = change_dictionaries(cfg, capture, samples, [3], capture_key="k", device="cpu")
    (row,) = rows
    assert row["layer"] == 3 and row["d_sae"] == d and row["explained_variance"] > 0.95, row
    # Each planted atom of the change has a feature of its own.
    assert np.all(np.abs(decoder_directions(saes[3]) @ atoms.T).max(0) > 0.95)
    assert row["change_norm_share"] == pytest.approx(np.linalg.norm(change, axis=1).mean()
                                                     / np.linalg.norm(shared + change, axis=1).mean(), rel=1e-5)
    import irmprobe.pipeline.stages.saes as stage

    trained = stage.train_sae

    def no_training(*args, **kwargs):
        raise AssertionError("a cached change dictionary was trained again")

    monkeypatch.setattr(stage, "train_sae", no_training)
    again, _ = change_dictionaries(cfg, capture, samples, [3], capture_key="k", device="cpu")
    assert torch.equal(again[3].W_dec, saes[3].W_dec)  # reused from the cache, not retrained
    assert row["seed"] == cfg.seed + 3
    # attribute.change_seed trains another dictionary (seed change_seed + layer), under its own cache key.
    monkeypatch.setattr(stage, "train_sae", trained)
    other = RunConfig.from_dict(cfg.to_dict() | {"attribute": cfg.to_dict()["attribute"] | {"change_seed": 100}})
    seeded, (seeded_row,) = change_dictionaries(other, capture, samples, [3], capture_key="k", device="cpu")
    assert seeded_row["seed"] == 103 and seeded_row["path"] != row["path"]
    assert not torch.equal(seeded[3].W_dec, saes[3].W_dec)


def _curve_row(k, faith, errors=0):
    share = {"value": faith, "ci": [faith - 0.05, faith + 0.05]}
    return {"k": k, "faithfulness": share, "completeness": {"value": 1 - faith, "ci": [0.0, 1.0]},
            "random": {"values": [0.0], "range": [0.0, 0.0]}, "errors_in_set": errors}


def test_the_verdict_line_says_when_the_error_terms_not_the_features_carry_the_reward():
    from irmprobe.analysis.verdict import attribution_line

    curves = {"bound": {"value": 0.32, "ci": [0.26, 0.36]}, "errors_only": {"value": 0.74, "ci": [0.7, 0.78]},
              "rows": [_curve_row(1, 0.3, 1), _curve_row(5, 0.75, 3)],
              "feature_rows": [_curve_row(1, 0.01), _curve_row(5, 0.02)]}
    result = {"kind": "mlp_out", "layers": [20, 22], "threshold": 0.6, "curves": curves, "smallest_k": 5,
              "smallest_k_features": None}
    line = attribution_line(result)
    assert line.startswith("no set of <= 5 SAE features") and "5 nodes (3 of them errors) reach 0.75" in line
    assert "the best reaches 0.02 (k=5);" in line  # a result cached before every-feature curves: no such text
    curves["features_all"] = {"value": 0.22, "ci": [0.1, 0.3]}
    assert "the best reaches 0.02 (k=5), every feature together 0.22;" in attribution_line(result)
    assert "(dictionaries of the change)" not in line
    change = attribution_line(result | {"dictionary": "change"})
    assert "at mlp_out at blocks 20, 22 (dictionaries of the change) carries" in change
    assert "their change dictionaries' error terms alone 74%" in change
    assert "the hook points carry 32%" in line and "error terms alone 74%" in line
    assert line.endswith("; known nulls: 0 of 2 random feature sets reach 60% (the highest 0.00)")
    result["smallest_k_features"] = 5
    curves["feature_rows"][1] = _curve_row(5, 0.7)
    assert attribution_line(result).startswith("5 SAE feature(s) at mlp_out at blocks 20, 22 carry 70%")
    # The named 5 carry 0.70 [0.65, 0.75], every feature together 0.22 [0.1, 0.3]: the other features cancel them.
    assert ("random 5-feature sets: +0.00 to +0.00, every feature together 0.22 (less than these 5 carry: the "
            "dictionaries' other features work against them, so what a set carries depends on how this dictionary "
            "cut up the change); the hook") in attribution_line(result)
    # With no set named, the best set's share is read the same way: 0.50 [0.45, 0.55] against 0.22 [0.1, 0.3].
    curves["feature_rows"][1] = _curve_row(5, 0.5)
    unnamed = attribution_line(result | {"smallest_k_features": None})
    assert "the best reaches 0.50 (k=5), every feature together 0.22 (less than these 5 carry" in unnamed
    curves["feature_rows"][1] = _curve_row(5, 0.7)
    # The set's lower end (0.65) above every feature's share (0.62) but not above its CI (to 0.70): not claimed.
    curves["features_all"] = {"value": 0.62, "ci": [0.55, 0.7]}
    assert "every feature together 0.62; the hook" in attribution_line(result)
    curves["features_all"] = {"value": 0.22, "ci": [0.1, 0.3]}
    # A random set at the threshold would have been named: it counts as a false naming.
    curves["feature_rows"][1]["random"]["values"] = [0.6, 0.2]
    assert attribution_line(result).endswith("known nulls: 1 of 3 random feature sets reach 60% (the highest 0.60)")
    # With only 5 candidate features, a "random" 5-feature set is the whole candidate set: not a null draw.
    curves["n_candidates"] = 5
    assert attribution_line(result).endswith("known nulls: 0 of 1 random feature sets reach 60% (the highest 0.00)")


def test_the_verdict_says_what_ablating_the_attributed_features_while_sampling_removed():
    from irmprobe.analysis.verdict import generation_text

    row = {"set": "attribution_change_faithful_20", "n_features": 20,
           "gain_share": {"share": 0.62, "ci": [0.41, 0.8]},
           "random": {"shares": [0.0, 0.1, 0.05, -0.02], "range": [-0.02, 0.1], "above_random": True}}
    text = generation_text([{"set": "none", "n_features": 0, "gain_share": {"share": 0.0, "ci": [0, 0]}}, row])
    assert text == ("; these 20 features ablated while the tuned model samples remove 62% [0.41, 0.80] of the RM's "
                    "reward gain (random 20-feature sets of the same dictionaries: -0.02 to +0.10; above them)")
    fallback = generation_text([row | {"set": "attribution_top_10", "n_features": 10,
                                       "random": row["random"] | {"above_random": False}}])
    assert fallback.startswith("; the top 10 attributed features ablated") and fallback.endswith("not above them)")
    assert generation_text([row | {"gain_share": {"share": 0.6, "ci": [None, 0.9]}}]) == ""  # undefined interval
    assert generation_text(None) == "" and generation_text([{"set": "irm_top_10", "gain_share": None}]) == ""
    # Beyond what patching the base's whole activation in at the hook points removes (its CI's upper end).
    bound = {"set": "patching bound: base resid_post at blocks 23", "gain_share": {"share": 0.3, "ci": [0.2, 0.4]}}
    assert generation_text([row, bound]).endswith(
        "above them), more than patching the base's whole activation in at the hook points removes (+0.30 [0.20, "
        "0.40]), so the share may overstate what these features carry of the tuning's change")
    assert generation_text([row, bound | {"gain_share": {"share": 0.3, "ci": [0.2, 0.45]}}]) == text  # overlaps
    beyond = row | {"gain_share": {"share": 1.1, "ci": [1.02, 1.2]}}
    assert generation_text([beyond, bound]).endswith("; the reward falls below the base model's")


def test_setting_every_node_tuned_is_the_tuned_model_and_none_tuned_is_the_patched_base(single):
    metric = single["metric"]
    # decode(f) + e reproduces the activation exactly: all nodes tuned = the tuned model unchanged.
    _, base, tuned, _, _ = single["parts"]
    with torch.no_grad():
        batch = metric.batches[0]
        clean = torch.log_softmax(tuned(input_ids=batch.tokens).logits[:, :-1], -1)
        clean = clean.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        r = ((clean - batch.logp_base) * batch.targets).sum(-1) * batch.weights
        spliced = metric._run(batch, {L: batch.f[L, "tuned"]}, {L: batch.e[L, "tuned"]})
    torch.testing.assert_close(spliced, r, atol=1e-4, rtol=1e-4)
    # A set and its complement: the complement setter flips features and error alike.
    setter = node_setter([Node(L, 3), Node(L, ERROR)], {L: single["sae"]}, complement=True)
    assert setter(L, "error") is False
    assert not setter(L, "features")[3] and setter(L, "features").sum() == D_SAE - 1


def test_each_hook_point_carries_what_patching_the_base_in_there_removes(single):
    """The tuning changed block L's MLP only: its output (or the residual stream after it) carries all of the
    implicit reward, any point upstream none; at the SAE's point the bound equals the attribution curves'."""
    tok, base, tuned, sae, ids = single["parts"]
    sets = {"mlp_out L": [("mlp_out", L)], "mlp_out 0": [("mlp_out", 0)], "resid_post L": [("resid_post", L)],
            "resid_post before L": [("resid_post", L - 1)], "both upstream": [("mlp_out", 0), ("resid_post", L - 1)],
            "mlp_out at every block": [("mlp_out", b) for b in range(4)]}
    bounds = hook_point_bounds(base, tuned, *_sequences(tok, ids), sets, batch_size=8)
    by = {b["label"]: b for b in bounds}
    assert [b["label"] for b in bounds] == list(sets)
    assert by["resid_post L"]["value"] == pytest.approx(1.0, abs=1e-5)  # downstream of L the models are one
    assert by["mlp_out at every block"]["value"] == pytest.approx(1.0, abs=1e-5)
    for label in ("mlp_out 0", "resid_post before L", "both upstream"):
        assert abs(by[label]["value"]) < 1e-5  # upstream of the change the two activations are equal
    assert by["both upstream"]["points"] == [["mlp_out", 0], ["resid_post", L - 1]]
    # The attribution's own bound (every node at its base value) is the base's activation patched in.
    curves = attribution_curves(single["metric"], [], [], n_random=0, candidates=[], seed=0)
    assert by["mlp_out L"]["value"] == pytest.approx(curves["bound"]["value"], abs=1e-4)
    assert by["mlp_out L"]["ci"] == pytest.approx(curves["bound"]["ci"], abs=1e-3)
    # A second change upstream (block 1's MLP writes u too): block L's output now carries a part only, the same
    # part the attribution measures with its SAE there, and the residual stream after L still carries it all.
    twice = copy.deepcopy(tuned)
    with torch.no_grad():
        twice.model.layers[1].mlp.down_proj.bias += 0.03 * planted_u(base, ids)
    bounds = hook_point_bounds(base, twice, *_sequences(tok, ids), sets, batch_size=8)
    by = {b["label"]: b for b in bounds}
    curves = attribution_curves(_metric(tok, base, twice, sae, ids), [], [], n_random=0, candidates=[], seed=0)
    assert 0.1 < by["mlp_out L"]["value"] < 0.9
    assert by["mlp_out L"]["value"] == pytest.approx(curves["bound"]["value"], abs=1e-4)
    assert by["resid_post L"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert by["resid_post before L"]["value"] > 0.1  # block 1's change passes through it
    # m(tuned) itself, against a sequence-by-sequence computation: sequences of uneven length (padding), uneven
    # counts per prompt (weights) and a prompt with base continuations only (left out).
    seqs, lens, prompt, source = _sequences(tok, ids, n_prompts=4, seed=1)
    seqs = [q[: len(q) - (i % 3)] for i, q in enumerate(seqs)]
    keep = [i for i in range(len(seqs)) if not (prompt[i] == 1 and source[i] == "tuned" and i % 2)]
    keep = [i for i in keep if not (prompt[i] == 2 and source[i] == "tuned")]  # prompt 2: base continuations only
    seqs, lens, prompt, source = ([x[i] for i in keep] for x in (seqs, lens, prompt, source))

    def r(seq, n):
        with torch.no_grad():
            ids_ = torch.tensor([seq])
            lt, lb = (torch.log_softmax(m(input_ids=ids_).logits[0, :-1].float(), -1) for m in (tuned, base))
            picked = ids_[0, 1:, None]
            return float((lt.gather(-1, picked) - lb.gather(-1, picked))[n - 1:].sum())

    by_prompt = {}
    for seq, n, p, src in zip(seqs, lens, prompt, source):
        by_prompt.setdefault(p, {}).setdefault(src, []).append(r(seq, n))
    expected = np.mean([np.mean(v["tuned"]) - np.mean(v["base"]) for v in by_prompt.values() if len(v) == 2])
    got = hook_point_bounds(base, tuned, seqs, lens, prompt, source, {"mlp_out L": [("mlp_out", L)]}, batch_size=3)
    assert got[0]["m_full"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="unknown hook kind 'attn_out' in 'a'"):
        hook_point_bounds(base, tuned, *_sequences(tok, ids), {"a": [("attn_out", 1)]})
    with pytest.raises(ValueError, match="the set 'b' has no hook point"):
        hook_point_bounds(base, tuned, *_sequences(tok, ids), {"b": []})


def planted_u(model, ids) -> torch.Tensor:
    """The unit direction the planted words' unembedding rows share (their mean row, normalised)."""
    u = model.lm_head.weight[ids].mean(0)
    return u / u.norm()


def test_the_verdict_line_names_the_other_hook_points_considered():
    from irmprobe.analysis.verdict import attribution_line

    curves = {"bound": {"value": 0.32, "ci": [0.26, 0.36]}, "errors_only": {"value": 0.74, "ci": [0.7, 0.78]},
              "rows": [_curve_row(1, 0.3, 1)], "feature_rows": [_curve_row(1, 0.01)]}
    result = {"kind": "mlp_out", "layers": [20, 22], "threshold": 0.6, "curves": curves, "smallest_k": None,
              "smallest_k_features": None}
    assert "considered" not in attribution_line(result)  # a result cached before the hook points were measured
    result["hook_points"] = [
        {"label": "mlp_out at the chosen blocks", "points": [["mlp_out", 20], ["mlp_out", 22]], "value": 0.32,
         "ci": [0.26, 0.36]},
        {"label": "resid_post at the chosen blocks", "points": [["resid_post", 20], ["resid_post", 22]],
         "value": 0.83, "ci": [0.8, 0.86]},
        {"label": "mlp_out at every block", "points": [["mlp_out", b] for b in range(30)], "value": 0.41,
         "ci": [0.35, 0.47]}]
    line = attribution_line(result)
    assert ("error terms alone 74% of that; the other hook points considered (each set patched together, same "
            "prompts) carry: resid_post at the chosen blocks 83% [0.80, 0.86], mlp_out at every block 41% "
            "[0.35, 0.47]") in line
    assert "mlp_out at the chosen blocks" not in line  # the run's own hook points are the bound already given


def test_the_spread_sets_find_the_one_block_whose_mlp_carries_the_change(single):
    """The tuning changed block L's MLP only: ranked first, its MLP output alone carries all of the implicit reward
    (the top 1 block is enough); ranked last, no top-n set short of every block carries more than a trace of it."""
    from irmprobe.analysis.verdict import spread_needed, spread_rows, spread_text
    from irmprobe.pipeline.stages.attribute import hook_point_sets

    tok, base, tuned, _, ids = single["parts"]
    for order, needed in (([L, 0, 1, 3], 1), ([0, 1, 3, L], 4)):
        sets = hook_point_sets([L], 4, order)
        assert list(sets) == ["mlp_out at the chosen blocks", "resid_post at the chosen blocks",
                              *(["mlp_out at the top 1 block"] if order[0] != L else []),
                              "mlp_out at the top 2 blocks", "mlp_out at the top 3 blocks", "mlp_out at every block"]
        assert sets["mlp_out at the top 3 blocks"] == [("mlp_out", b) for b in sorted(order[:3])]
        bounds = hook_point_bounds(base, tuned, *_sequences(tok, ids), sets, batch_size=8)
        result = {"kind": "mlp_out", "layers": [L], "threshold": 0.6, "hook_points": bounds,
                  "spread_order": {"order": order, "ranked_by": "a test's order"}}
        rows = spread_rows(result)
        assert [n for n, _ in rows] == [1, 2, 3, 4]
        values = [h["value"] for _, h in rows]
        if needed == 1:  # the chosen block is the top 1: its set stands for n = 1
            assert rows[0][1]["label"] == "mlp_out at the chosen blocks"
            assert values == pytest.approx([1.0] * 4, abs=1e-5)
        else:
            # upstream of L the two models' MLP outputs are equal; block 3's differs only by what reaches its input
            assert values[:2] == pytest.approx([0.0] * 2, abs=1e-5) and abs(values[2]) < 0.1
            assert values[3] == pytest.approx(1.0, abs=1e-5)
        assert spread_needed(result) == needed
        assert spread_text(result).startswith("; over the blocks' MLPs (point estimates): the MLP outputs of the top "
                                              "1, 2, 3 and all 4 blocks (ranked by a test's order) carry ")
        assert spread_text(result).endswith(f"of the implicit reward; the fewest that carry 60% of it: "
                                            f"the top {needed}")
    with pytest.raises(ValueError, match="must rank each of the 4 blocks once"):
        hook_point_sets([L], 4, [0, 1, 2, 2])
    from irmprobe.pipeline.stages.attribute import spread_sizes

    assert spread_sizes(30) == [1, 2, 3, 5, 10, 15, 20] and spread_sizes(4) == [1, 2, 3]
    assert spread_sizes(80) == [1, 2, 3, 5, 10, 15, 20, 40, 60]  # a deep model: no jump from 20 to every block
    assert len(hook_point_sets([5], 80, list(range(80)))) == 2 + 9 + 1  # the chosen block is not the top one


def test_ranked_by_their_own_share_the_changed_blocks_mlp_comes_first(single):
    """spread_ranking: reward: each block's MLP output patched alone; the tuned block L carries it all, the blocks
    upstream none (block 3's output differs only by what reaches its input)."""
    from irmprobe.pipeline.stages.attribute import reward_order

    tok, base, tuned, _, ids = single["parts"]
    order, ranked_by, shares = reward_order(base, tuned, *_sequences(tok, ids), batch_size=8)
    assert order[0] == L and sorted(order) == [0, 1, 2, 3]
    assert ranked_by.startswith("each block's own share of the implicit reward")
    assert [s["block"] for s in shares] == [0, 1, 2, 3] and shares[L]["value"] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(shares[b]["value"]) < 1e-5 for b in range(L))
    assert shares[L]["ci"][0] <= shares[L]["value"] <= shares[L]["ci"][1]
    # A second change upstream (block 1's MLP writes the reward direction too): block 1 now ranks second.
    twice = copy.deepcopy(tuned)
    with torch.no_grad():
        twice.model.layers[1].mlp.down_proj.bias += 0.03 * planted_u(base, ids)
    order, _, shares = reward_order(base, twice, *_sequences(tok, ids), batch_size=8)
    assert set(order[:2]) == {1, L} and shares[1]["value"] > 0.1
    # No tuning at all (m(tuned) = 0): no share is defined, and the label says the order is only the blocks'.
    order, ranked_by, shares = reward_order(base, base, *_sequences(tok, ids), batch_size=8)
    assert order == [0, 1, 2, 3] and all(s["value"] is None for s in shares)
    assert ranked_by == "block index (no block's own share of the implicit reward is defined)"


def test_the_spread_ranking_must_be_layers_or_reward():
    from irmprobe.config import AttributeConfig

    assert AttributeConfig(spread_ranking="reward").spread_ranking == "reward"
    with pytest.raises(ValueError, match="spread_ranking must be 'layers' or 'reward', got 'kl'"):
        AttributeConfig(spread_ranking="kl")


def test_the_spread_blocks_are_ranked_by_mlp_patching_or_else_by_mlp_weights():
    from types import SimpleNamespace

    from irmprobe.pipeline.stages.attribute import mlp_order

    by_patching = SimpleNamespace(patching={"kind": "mlp_out", "ranking": [2, 0, 1]}, per_block=[1.0, 3.0, 2.0],
                                  per_submodule={"mlp": [0.5, 0.1, 0.3]})
    assert mlp_order(by_patching) == ([2, 0, 1], "the share of KL(tuned || base) patching each block's MLP output "
                                                 "removes")
    # Patching the residual stream ranks what flows past a block, not its MLP: the MLP weights rank instead.
    by_resid = SimpleNamespace(patching={"kind": "resid_post", "ranking": [2, 1, 0]}, per_block=[1.0, 3.0, 2.0],
                               per_submodule={"mlp": [0.5, 0.1, 0.3]})
    assert mlp_order(by_resid) == ([0, 2, 1], "the change in each block's MLP weights")
    # No MLP weight changed (or none is named): the blocks' whole weights rank, and the label says so.
    for mlp in ({}, {"mlp": [0.0, 0.0, 0.0]}):
        assert mlp_order(SimpleNamespace(patching=None, per_block=[1.0, 3.0, 2.0], per_submodule=mlp)) == (
            [1, 2, 0], "the change in each block's weights")


def test_the_verdict_says_how_many_blocks_mlps_carry_the_threshold():
    from irmprobe.analysis.verdict import attribution_line, spread_needed, spread_rows

    curves = {"bound": {"value": 0.32, "ci": [0.26, 0.36]}, "errors_only": {"value": 0.74, "ci": [0.7, 0.78]},
              "rows": [_curve_row(1, 0.3, 1)], "feature_rows": [_curve_row(1, 0.01)]}
    order = [22, 21, 20] + [b for b in range(30) if b not in (20, 21, 22)]

    def mlp(label, blocks, value):
        return {"label": label, "points": [["mlp_out", b] for b in sorted(blocks)], "value": value,
                "ci": [value - 0.05, value + 0.05]}

    result = {"kind": "mlp_out", "layers": [20, 21, 22], "threshold": 0.6, "curves": curves, "smallest_k": None,
              "smallest_k_features": None, "spread_order": {"order": order, "ranked_by": "KL"},
              "hook_points": [mlp("mlp_out at the chosen blocks", [20, 21, 22], 0.32),
                              {"label": "resid_post at the chosen blocks",
                               "points": [["resid_post", b] for b in (20, 21, 22)], "value": 0.83, "ci": [0.8, 0.86]},
                              mlp("mlp_out at the top 1 block", order[:1], 0.12),
                              mlp("mlp_out at the top 5 blocks", order[:5], 0.45),
                              mlp("mlp_out at the top 10 blocks", order[:10], 0.61),
                              mlp("mlp_out at every block", order, 0.85)]}
    line = attribution_line(result)
    assert ("the other hook points considered (each set patched together, same prompts) carry: resid_post at the "
            "chosen blocks 83% [0.80, 0.86]; over the blocks' MLPs (point estimates): the MLP outputs of the top 1, "
            "3, 5, 10 and all 30 blocks (ranked by KL) carry 12%, 32%, 45%, 61%, 85% of the implicit reward; the "
            "fewest that carry 60% of it: the top 10") in line
    assert spread_needed(result) == 10
    from irmprobe.reporting.summary import _spread
    from irmprobe.reporting.tracking import headline_scalars

    assert _spread(result) == (" (the top n blocks ranked by KL; 60% of the implicit reward needs the top 10 blocks' "
                               "MLP outputs)")
    head = headline_scalars({"attribution": result | {"exact": {"spearman": None}}})
    assert head["attribution/mlp_blocks_needed"] == 10 and "attribution/decision_r2" not in head
    view = {"test_r2": 0.38, "tau": 0.4}  # with dictionaries of the change, their decision-side view
    changed = headline_scalars({"attribution": result | {"exact": {"spearman": None}, "decision_view": view}})
    assert (changed["attribution/decision_r2"], changed["attribution/decision_tau"]) == (0.38, 0.4)
    assert head["attribution/hook_points/mlp_out_at_the_top_5_blocks"] == 0.45
    assert head["attribution/mlp_top/3"] == 0.32 and head["attribution/mlp_top/30"] == 0.85  # the chosen set is n=3
    from irmprobe.reporting.interactive import mlp_spread

    fig = mlp_spread({"attribution": result})
    assert list(fig.data[0].x) == [1, 3, 5, 10, 30] and list(fig.data[0].y) == [0.12, 0.32, 0.45, 0.61, 0.85]
    assert list(fig.data[0].customdata[1]) == ["blocks 20 21 22", "[0.270, 0.370]"]
    assert fig.data[0].customdata[-1][0] == "30 blocks"
    assert [s.y0 for s in fig.layout.shapes] == [0.6, 0.83]  # the threshold, the residual stream after the blocks
    assert mlp_spread({"attribution": {k: v for k, v in result.items() if k != "spread_order"}}) is None
    gaps = result | {"hook_points": [dict(h) for h in result["hook_points"]]}
    gaps["hook_points"][2]["value"] = None  # an undefined share is left out; a missing CI draws no bar
    gaps["hook_points"][3]["ci"] = None
    fig = mlp_spread({"attribution": gaps})
    assert list(fig.data[0].x) == [3, 5, 10, 30] and fig.data[0].customdata[1][1] == ""
    result["hook_points"][4]["value"] = 0.59
    assert spread_needed(result) == 30 and "the fewest that carry 60% of it: the top 30" in attribution_line(result)
    result["hook_points"][3]["value"] = 0.62  # not monotone: the fewest top blocks reaching it, not the last
    assert spread_needed(result) == 5
    result["hook_points"][3]["value"] = result["hook_points"][5]["value"] = 0.59
    assert spread_needed(result) is None and "none carries 60% of it" in attribution_line(result)
    assert _spread(result).endswith("needs more than every MLP output)")
    undefined = result | {"hook_points": [h | {"value": None, "ci": None} for h in result["hook_points"]]}
    assert "over the blocks' MLPs: undefined (m(tuned) <= 0)" in attribution_line(undefined)
    assert _spread(undefined).endswith("shares undefined: m(tuned) <= 0)") and spread_needed(undefined) is None
    # A mixed-kind set is not an MLP prefix, and one such set alone is nothing to spread over.
    mixed = result | {"hook_points": [result["hook_points"][1], result["hook_points"][0]]}
    assert spread_rows(mixed) == [] and "over the blocks' MLPs" not in attribution_line(mixed)
    del result["spread_order"]  # a result cached before the spread sets: every other set is listed as before
    assert "mlp_out at every block 59%" in attribution_line(result)


def test_integrated_gradients_agree_with_exact_patching(planted_llama):
    """Graded effects: five planted features (one against the reward) and a planted error direction."""
    tok, base, tuned, sae, ids, idx = _planted(planted_llama, [(2.0, 0.03), (1.0, 0.03), (0.5, 0.03), (0.25, 0.03),
                                                                (-1.0, 0.03)], error=(0.7, 0.03), seed=3)
    metric = _metric(tok, base, tuned, sae, ids)
    ranked = ranked_nodes(metric.integrated_gradients(steps=8))
    check = exact_check(metric, ranked, 6)
    names = {r["node"] for r in check["rows"]}
    assert names == {f"L{L}/f{i}" for i in idx} | {f"L{L}/error"}  # the six planted nodes, nothing else
    assert check["spearman"] >= 0.9
    for row in check["rows"]:
        assert np.sign(row["attribution"]) == np.sign(row["exact"])
    err = next(r for r in check["rows"] if r["node"] == f"L{L}/error")
    assert err["exact"] > 0  # the error node carries its planted share: dropping it would lose that
    assert [n.name for n, _ in ranked[:1]] == [f"L{L}/f{idx[0]}"]
    assert ranked[-1][0].name == f"L{L}/f{idx[4]}"  # the feature against the reward comes last


def test_bad_input_is_refused(single):
    _, base, tuned, sae, _ = single["parts"]
    with pytest.raises(ValueError, match="kind must be"):
        ImplicitReward(base, tuned, {L: sae}, "attn", [[1, 2, 3]], [1], [0], ["tuned"])
    with pytest.raises(ValueError, match="both models"):
        ImplicitReward(base, tuned, {L: sae}, "mlp_out", [[1, 2, 3]], [1], [0], ["tuned"])
    with pytest.raises(ValueError, match="one length"):
        ImplicitReward(base, tuned, {L: sae}, "mlp_out", [[1, 2, 3]], [1, 1], [0], ["tuned"])
    with pytest.raises(ValueError, match="ig_steps"):
        single["metric"].integrated_gradients(steps=0)
    from irmprobe.config import RunConfig

    with pytest.raises(ValueError, match="dictionary must be 'activations' or 'change', got 'diff'"):
        RunConfig.from_dict({"attribute": {"dictionary": "diff"}})
    with pytest.raises(ValueError, match="change_architecture must be one of standard, topk"):
        RunConfig.from_dict({"attribute": {"change_architecture": "relu"}})


@pytest.mark.parametrize("change", [False, True], ids=["activations", "change"])
def test_the_attributed_feature_ablated_during_generation_removes_the_gain_and_random_sets_do_not(planted_llama,
                                                                                                 change):
    """A stronger planted feature (so that sampling shows the gain): attribution names it, and zero-ablating it
    while the tuned model samples removes the RM gain, where random features of the same dictionary do not. As a
    dictionary of the change (the base writes nothing planted at block L, so the change is the planted one), the
    feature is set to its zero-change value with the base in lockstep."""
    from irmprobe.models.rewards import LexiconRM
    from irmprobe.validation.ablation import (
        FeatureSet,
        against_random,
        attributed_features,
        attribution_set,
        paired_rows,
    )

    # Random features as weak as an SAE's typical feature against the residual (zero-ablating one of the dense,
    # strong random features above moves the whole stream, and with it the samples).
    tok, base, tuned, sae, ids, (j, _) = _planted(planted_llama, [(1.0, 0.3), (0.0, 0.06)], enc_scale=0.3)
    metric = _metric(tok, base, tuned, sae, ids, change=change)
    ranked = ranked_nodes(metric.integrated_gradients(steps=8))
    curves = attribution_curves(metric, ranked, [1, 2], n_random=2, seed=0,
                                candidates=[Node(L, i) for i in range(D_SAE)])
    k = smallest_faithful(curves, 0.6)
    result = {"named": [{"node": n.name, "attribution": a} for n, a in ranked[:k]],
              "top": [{"node": n.name, "attribution": a} for n, a in ranked],
              "dictionary": "change" if change else "activations"}
    label, features = attributed_features(result, 10)
    assert features == {L: (j,)}
    assert label == ("attribution_change_faithful_1" if change else "attribution_faithful_1")
    assert (attribution_set(result, 10) is None) is change  # change features are not the IRM's SAE features
    rng = np.random.default_rng(0)
    others = [i for i in range(D_SAE) if i != j]
    kw = {"mode": "change", "saes": {L: sae}} if change else {}
    sets = [FeatureSet(label, features, **kw)] + [
        FeatureSet(f"random_1 #{i + 1} (control)", {L: (int(rng.choice(others)),)}, **kw) for i in range(4)]
    prompts = ["The train left", "I bought a", "She said that", "Later that day", "We went to the", "He told me",
               "It was a", "My friend and", "Then the", "You can", "After the game", "Our house"]
    rows = paired_rows(base, tuned, tok, {L: sae}, sets, LexiconRM({w: 1.0 for w in WORDS}, scale=1.0), prompts,
                       None, samples_per_prompt=4, max_new_tokens=12, seed=0, targeted=(label,))
    rows = {r["set"]: r for r in against_random(rows, (label,))}
    assert rows["none"]["gain_test"]["positive"]
    target = rows[label]
    assert target["gain_share"]["share"] >= 0.8
    assert all(abs(s) < 0.15 for s in target["random"]["shares"]) and len(target["random"]["shares"]) == 4
    assert target["random"]["above_random"] is True


def test_a_later_residual_hook_point_cuts_the_earlier_ones_off(single):
    """resid_post at blocks 1 and L: block 1's nodes act only through block L's stream, replaced wholesale."""
    tok, base, tuned, sae, ids = single["parts"]
    metric = _metric(tok, base, tuned, sae, ids, n_prompts=4)
    metric = ImplicitReward(base, tuned, {1: sae, L: sae}, "resid_post",
                            [list(b) for batch in metric.batches for b in batch.tokens.tolist()],
                            [6] * 16, np.repeat(np.arange(4), 4), ["tuned", "tuned", "base", "base"] * 4)
    attribution = metric.integrated_gradients(steps=2)
    assert not np.any(attribution[1][0]) and attribution[1][1] == 0.0
    assert np.any(attribution[L][0]) and attribution[L][1] != 0.0


def test_the_bilinear_decision_view_fits_the_planted_log_ratio_where_the_state_alone_cannot(planted_llama):
    """On the planted model: r_t of a token is large where the planted feature's direction raises that token's logit,
    so features at t-1 times their decoder's direct effect on the written token fit r_t; the t-1 state alone
    gives every candidate token one value and cannot. The feature sits in the last block, so its direct path is the
    whole path up to the final norm's per-position scale (one block lower, the block above bends it: R2 0.74)."""
    from irmprobe.activations.patching import output_hooks
    from irmprobe.analysis.views import bilinear_inputs
    from irmprobe.irm.crossfit import cross_fit_irm, two_folds
    from irmprobe.models.loading import readout
    from irmprobe.saes.evaluate import decoder_directions, encode

    tok, base, tuned, sae, ids, _ = _planted(planted_llama, [(1.0, 0.04), (0.0, 0.06)], enc_scale=0.3, block=3)
    rng = np.random.default_rng(0)
    seqs = torch.tensor([[int(rng.choice(ids)) if rng.random() < 0.3 else int(rng.integers(1, len(tok)))
                          for _ in range(16)] for _ in range(96)])
    acts = []
    with torch.no_grad(), output_hooks(tuned, [("mlp_out", 3)], lambda p, a: acts.append(a.detach()) or None):
        logp_t = torch.log_softmax(tuned(seqs).logits, -1)
    with torch.no_grad():
        logp_b = torch.log_softmax(base(seqs).logits, -1)
    nxt = seqs[:, 1:]
    r = (logp_t[:, :-1].gather(-1, nxt[..., None]) - logp_b[:, :-1].gather(-1, nxt[..., None])).squeeze(-1)
    prev = acts[0][:, :-1].reshape(-1, 32).numpy()  # the state at t-1 of each written token t
    y, written = r.reshape(-1).numpy().astype(np.float64), nxt.reshape(-1).numpy()
    groups = np.repeat(np.arange(len(seqs)), seqs.shape[1] - 1)  # one sequence, one prompt
    folds = two_folds(groups, 0)
    F = encode(sae, prev)
    unembed, gamma = readout(tuned)
    Z = bilinear_inputs(F, written, decoder_directions(sae), unembed, gamma)
    bilinear = cross_fit_irm("bilinear", Z, y, groups, folds=folds, alphas=(0.01, 0.1, 1.0, 10.0))
    state = cross_fit_irm("state", F, y, groups, folds=folds, alphas=(0.01, 0.1, 1.0, 10.0))
    assert bilinear.test_r2 >= 0.8
    assert state.test_r2 <= 0.1


def _seed_result(seeds, faithfulness, k_grid=(1, 10, 100), threshold=0.6):
    """An attribute-stage result whose feature rows have these faithfulness values (None: undefined)."""
    rows = [{"k": k, "faithfulness": {"value": f}, "completeness": {"value": None if f is None else 1 - f}}
            for k, f in zip(k_grid, faithfulness)]
    k = next((r["k"] for r in rows if r["faithfulness"]["value"] is not None
              and r["faithfulness"]["value"] >= threshold), None)
    return {"curves": {"feature_rows": rows, "bound": {"value": 0.9},
                       "features_all": {"value": 0.95, "ci": [0.9, 1.0]}},
            "smallest_k_features": k, "dictionaries": [{"seed": s, "explained_variance": 0.8} for s in seeds],
            "named": [{"node": f"L1/f{i}", "attribution": 0.1, "contexts": []} for i in range(k or 0)], "seconds": 1.0,
            "layers": [1, 3]}


def test_a_named_set_holds_across_dictionary_seeds_only_when_every_seed_has_one():
    """The seeds stage's call: "k features carry it" holds only when every other seed's dictionaries also reach the
    threshold with at most k features; the verdict names each seed's smallest set, or its best, and says which
    case."""
    from irmprobe.analysis.verdict import attribution_line, seeds_hold, seeds_text
    from irmprobe.pipeline.stages.seeds import seed_check
    from irmprobe.reporting.summary import attribution_section

    primary = _seed_result([1, 3], [0.2, 0.7, 0.9])  # 10 features reach 0.6
    same = _seed_result([101, 103], [0.1, 0.65, 0.9])  # 10 too
    larger, missed = _seed_result([201, 203], [0.1, 0.3, 0.65]), _seed_result([301, 303], [0.1, 0.2, 0.39])
    c_same, c_larger, c_missed = seed_check(same, 100), seed_check(larger, 200), seed_check(missed, 300)
    assert c_larger["smallest_k_features"] == 100 and c_larger["faithfulness"] == 0.65
    assert c_same["block_seeds"] == [101, 103] and c_same["completeness"] == pytest.approx(0.35)
    assert c_missed["smallest_k_features"] is None and c_missed["best"] == {"k": 100, "faithfulness": 0.39}
    one = {"primary": seed_check(primary, 0), "max_k": 100, "threshold": 0.6, "dictionary": "change"}
    assert seeds_hold(one | {"checks": [c_same]}) is True
    assert seeds_hold(one | {"checks": [c_same, c_larger]}) is False  # a set, but of 100 features, not 10
    assert seeds_hold(one | {"checks": [c_same, c_missed]}) is False
    assert seeds_hold(one | {"checks": []}) is None  # nothing checked
    assert seeds_hold(one | {"primary": seed_check(missed, 0), "checks": [c_same]}) is None  # nothing named
    seeds = one | {"checks": [c_larger, c_missed]}
    text = seeds_text(seeds)
    assert "a property of this dictionary (change seed 0)" in text and "(at most 10 features to hold)" in text
    assert "change seed 200: 100 features (faithfulness 0.65, completeness 0.35)" in text
    assert "change seed 300: none of <= 100 (best 0.39 at k=100)" in text
    assert "holds across 2 dictionary seeds" in seeds_text(one | {"checks": [c_same]})
    assert seeds_text(None) == "" and seeds_text({"skipped": "seeds.checks is 0"}) == ""
    # The attribution's verdict line ends with it; the summary lists every seed.
    result = primary | {"kind": "resid_post", "layers": [1, 3], "dictionary": "change", "threshold": 0.6}
    result["curves"] = primary["curves"] | {"errors_only": {"value": 0.1, "ci": [0.0, 0.2]},
                                            "bound": {"value": 0.9, "ci": [0.8, 1.0]}}
    result["curves"]["feature_rows"][1] |= {"faithfulness": {"value": 0.7, "ci": [0.6, 0.8]},
                                            "completeness": {"value": 0.3}, "random": {"range": [-0.1, 0.1]}}
    assert attribution_line(result | {"seed_checks": seeds}).endswith(text)
    full = result | {"seed_checks": seeds, "dictionaries": [], "n_prompts": [6, 6], "ig_steps": 8, "top": [],
                     "rank_half": {"m_full": 1.0, "m_empty": 0.0, "ig_sum": 1.0},
                     "exact": {"rows": [], "spearman": None}, "curves": result["curves"] | {"rows": []}}
    lines = attribution_section(full)
    assert any(line.endswith("the named set does not hold across them") for line in lines)
    assert sum(line.startswith("  change seed ") for line in lines) == 3
    from irmprobe.reporting.tracking import headline_scalars

    head = headline_scalars({"attribution": result | {"seed_checks": seeds, "exact": {"spearman": None}}})
    assert head["attribution/seed_checks"] == 2 and head["attribution/holds_across_seeds"] is False


def test_a_named_set_holds_only_if_its_features_counterparts_carry_it_at_every_seed():
    """Same size is not same features: a seed whose smallest set is as small, but whose counterparts of the named
    features (closest decoder directions) carry less than the threshold, breaks "holds"."""
    from irmprobe.analysis.verdict import counterparts_hold, seeds_hold, seeds_text
    from irmprobe.pipeline.stages.seeds import seed_check
    from irmprobe.reporting.tracking import headline_scalars

    primary = _seed_result([1, 3], [0.2, 0.7, 0.9])

    def matched(faith, cosines):
        return {"features": [{"node": f"L1/f{i}", "counterpart": f"L1/f{i + 5}", "cosine": c}
                             for i, c in enumerate(cosines)], "n_distinct": len(cosines), "match_cosine": 0.7,
                "faithfulness": {"value": faith, "ci": [faith - 0.1, faith + 0.1]},
                "completeness": {"value": 1 - faith, "ci": [0.0, 1.0]}}

    same = _seed_result([101, 103], [0.1, 0.65, 0.9]) | {"matched": matched(0.3, [0.95, 0.4] + [0.5] * 8)}
    check = seed_check(same, 100)
    assert check["matched"]["faithfulness"]["value"] == 0.3  # the stage keeps what the attribution measured
    one = {"primary": seed_check(primary, 0), "max_k": 100, "threshold": 0.6, "dictionary": "change",
           "checks": [check]}
    assert counterparts_hold(one) is False and seeds_hold(one) is False  # 10 features, but other ones
    text = seeds_text(one)
    assert "(at most 10 features to hold, and its features' counterparts reaching 60%)" in text
    assert ("change seed 100: 10 features (faithfulness 0.65, completeness 0.35); the named features' counterparts "
            "(closest decoder direction: 1 of 10 at cosine >= 0.7, median 0.50) carry 0.30") in text
    good = one | {"checks": [check | {"matched": matched(0.75, [0.9] * 10)}]}
    assert counterparts_hold(good) is True and seeds_hold(good) is True
    # A check from before the counterparts were measured: the size alone decides, as it did.
    old = one | {"checks": [{k: v for k, v in check.items() if k != "matched"}]}
    assert counterparts_hold(old) is None and seeds_hold(old) is True
    result = primary | {"seed_checks": one, "exact": {"spearman": None}}
    result["curves"] = primary["curves"] | {"errors_only": {"value": 0.1, "ci": [0.0, 0.2]}}
    assert headline_scalars({"attribution": result})["attribution/counterparts_hold"] is False


def test_without_a_named_set_the_seed_checks_match_the_top_k_the_ablation_takes():
    """No faithful set: the seeds stage matches the attribution's top k features of positive attribution (errors left
    out), the very set the ablate stage ablates, and the verdict says what their counterparts carry at each seed,
    beside what they carry with the run's own dictionaries; it makes no "holds" call on them."""
    from irmprobe.analysis.verdict import counterparts_hold, seeds_hold, seeds_text
    from irmprobe.pipeline.stages.seeds import ranked_features, seed_check
    from irmprobe.validation.ablation import attributed_features

    primary = _seed_result([1, 3], [0.05, 0.16, 0.39])  # none reaches 0.6
    primary["top"] = [{"node": "L3/error", "attribution": 2.0}, {"node": "L3/f7", "attribution": 0.5},
                      {"node": "L1/f2", "attribution": 0.4}, {"node": "L3/f9", "attribution": 0.3},
                      {"node": "L1/f4", "attribution": -0.2}]
    nodes, here = ranked_features(primary, 10)
    assert [n.name for n in nodes] == ["L1/f2", "L3/f7", "L3/f9"]  # positive, no error, by block
    assert attributed_features(primary, 10)[1] == {3: (7, 9), 1: (2,)}  # the ablate stage's set: the same features
    assert here is None  # 3 features: off the curve's grid (1, 10, 100)
    nodes, here = ranked_features(primary, 1)
    assert [n.name for n in nodes] == ["L3/f7"] and here == 0.05  # the curve's k = 1
    named = _seed_result([1, 3], [0.2, 0.7, 0.9])
    assert [n.name for n in ranked_features(named, 1)[0]] == [f"L1/f{i}" for i in range(10)]  # a named set wins
    assert ranked_features(primary | {"top": [{"node": "L3/error", "attribution": 2.0}]}, 10) == ([], None)

    matched = {"features": [{"node": "L3/f7", "counterpart": "L3/f1", "cosine": 0.9}], "n_distinct": 1,
               "match_cosine": 0.7, "faithfulness": {"value": 0.02, "ci": [0.0, 0.04]},
               "completeness": {"value": 0.98, "ci": [0.9, 1.0]}}
    other = _seed_result([101, 103], [0.1, 0.2, 0.49]) | {"matched": matched}
    other["curves"]["feature_rows"][0]["random"] = {"values": [0.001, 0.012], "range": [0.001, 0.012]}  # k = 1
    check = seed_check(other, 100)
    assert check["matched"]["random"] == [0.001, 0.012]  # the control of the counterparts' share, kept
    seeds = {"primary": seed_check(primary, 0), "checks": [check], "max_k": 100, "threshold": 0.6,
             "dictionary": "change", "matched_set": {"kind": "top", "k": 1, "nodes": ["L3/f7"], "faithfulness": 0.05}}
    text = seeds_text(seeds)
    assert text.startswith("; no set named, so the top 1 attributed features (the set the ablation takes; they carry "
                           "0.05 here) are matched in dictionaries of other seeds: change seed 100: none of <= 100")
    assert ("the top 1 attributed features' counterparts (closest decoder direction: 1 of 1 at cosine >= 0.7, "
            "median 0.90) carry 0.02 (random 1-feature sets of those dictionaries: 0.00 to 0.01)") in text
    assert seeds_hold(seeds) is None and counterparts_hold(seeds) is None  # no threshold call on a top-k set
    assert "are matched in dictionaries" not in seeds_text({k: v for k, v in seeds.items() if k != "matched_set"})
    # The report's summary says the same: what was matched, what it carries here, what its counterparts carry.
    from irmprobe.reporting.summary import attribution_section

    result = primary | {"kind": "resid_post", "layers": [1, 3], "dictionary": "change", "threshold": 0.6,
                        "seed_checks": seeds, "dictionaries": [], "n_prompts": [6, 6], "ig_steps": 8,
                        "rank_half": {"m_full": 1.0, "m_empty": 0.0, "ig_sum": 1.0},
                        "exact": {"rows": [], "spearman": None}}
    result["curves"] = primary["curves"] | {"rows": [], "errors_only": {"value": 0.1, "ci": [0.0, 0.2]},
                                            "bound": {"value": 0.9, "ci": [0.8, 1.0]}}
    lines = attribution_section(result)
    assert any(line.endswith("no set was named with the run's dictionaries; the top 1 attributed features (the set "
                             "the ablation takes; they carry 0.05 here) are matched in each other seed's "
                             "dictionaries") for line in lines)
    assert any(line.startswith("  change seed 100 ") and line.endswith(
        "the top 1 attributed features' counterparts (closest decoder direction: 1 of 1 at cosine >= 0.7, median "
        "0.90) carry 0.02 (random 1-feature sets of those dictionaries: 0.00 to 0.01)") for line in lines)


def test_counterparts_are_found_by_decoder_direction_and_carry_what_the_named_feature_did(single):
    """Another dictionary holding the planted feature at another index (and every other feature shuffled) gives it
    as the counterpart, with cosine 1, carrying what the named feature carried; a dictionary without the planted
    direction gives a poor counterpart that carries nothing."""
    from irmprobe.validation.attribution import MATCH_COSINE, counterparts, set_shares

    tok, base, tuned, sae, ids = single["parts"]
    j = single["j"]
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))
    shuffled = copy.deepcopy(sae)
    with torch.no_grad():
        shuffled.W_dec.copy_(sae.W_dec[perm])
        shuffled.W_enc.copy_(sae.W_enc[:, perm])
        shuffled.b_enc.copy_(sae.b_enc[perm])
    where = int(torch.nonzero(perm == j)[0])  # the planted feature's index in the shuffled dictionary
    assert where != j
    match = counterparts([Node(L, j), Node(L, ERROR)], {L: sae}, {L: shuffled})
    assert match == [{"node": f"L{L}/f{j}", "counterpart": f"L{L}/f{where}", "cosine": pytest.approx(1.0)}]
    other = _metric(tok, base, tuned, shuffled, ids)
    shares = set_shares(other, [Node.parse(match[0]["counterpart"])])
    assert shares["faithfulness"]["value"] >= 0.9 and shares["completeness"]["value"] <= 0.1
    own = set_shares(single["metric"], [Node(L, j)])
    assert shares["faithfulness"]["value"] == pytest.approx(own["faithfulness"]["value"], abs=1e-3)
    # Without the planted direction (its decoder and encoder replaced by another feature's), no feature matches it.
    blind = copy.deepcopy(sae)
    with torch.no_grad():
        blind.W_dec[j] = sae.W_dec[(j + 7) % D_SAE]
        blind.W_enc[:, j] = sae.W_enc[:, (j + 7) % D_SAE]
    poor = counterparts([Node(L, j)], {L: sae}, {L: blind})[0]
    assert poor["cosine"] < MATCH_COSINE
    assert set_shares(_metric(tok, base, tuned, blind, ids),
                      [Node.parse(poor["counterpart"])])["faithfulness"]["value"] < 0.1
    with pytest.raises(ValueError, match="no dictionary at block 3 in both"):
        counterparts([Node(3, 0)], {L: sae}, {L: shuffled})
    assert Node.parse("L12/f7") == Node(12, 7) and Node.parse("L3/error") == Node(3, ERROR)
    with pytest.raises(ValueError, match="not a node name: 'L3/x7'"):
        Node.parse("L3/x7")


def _tiny(arch: str):
    """A random 4-block model of width 32 of family ``arch`` (eval mode) and a tuned copy with blocks 1 and 2
    perturbed (block 1 is skipped by the fast forwards: its tuned output must be the one handed on)."""
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=64)
    cls, config = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**small, num_key_value_heads=2)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**small, num_key_value_heads=2)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**small, num_key_value_heads=2, head_dim=8)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**small, rotary_pct=0.25)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64)),
        "gpt_neo": (tf.GPTNeoForCausalLM, tf.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                                                          attention_types=[[["global", "local"], 2]], window_size=4,
                                                          max_position_embeddings=64)),
    }[arch]
    torch.manual_seed(3)
    model = cls(config)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.split(".")[-1] in ("1", "2") and name.split(".")[-2] in ("layers", "h"):
                for p in module.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tuned.eval()


FAST_FAMILIES = ("llama", "qwen2", "gemma2", "gpt_neox", "gpt2", "gpt_neo")


@pytest.mark.parametrize("arch", FAST_FAMILIES)
@pytest.mark.parametrize("kind", ["mlp_out", "resid_post"])
def test_forwards_that_start_after_the_blocks_before_the_first_hook_point_equal_full_forwards(arch, kind):
    from dataclasses import replace

    from irmprobe.activations.capture import hook_module

    base, tuned = _tiny(arch)
    torch.manual_seed(4)
    saes = {}
    for layer in (2, 3):
        saes[layer] = StandardSAE(StandardSAEConfig(d_in=32, d_sae=D_SAE))
        with torch.no_grad():
            for p in saes[layer].parameters():
                p.copy_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, size=int(rng.integers(8, 14))).tolist() for _ in range(12)]
    metric = ImplicitReward(base, tuned, saes, kind, seqs, [4] * 12, [i // 4 for i in range(12)],
                            ["tuned", "tuned", "base", "base"] * 3, batch_size=5)
    assert len(metric.skipped) == 2 and all(b.prefix is not None for b in metric.batches)
    calls = []
    first = hook_module(tuned, "blocks.0.hook_mlp_out").register_forward_hook(lambda *a: calls.append(1))
    mask = np.zeros(D_SAE, dtype=bool)
    mask[::3] = True
    settings = [None, lambda layer, what: False, lambda layer, what: mask if what == "features" else layer == 3]
    fast = [metric.evaluate(s) for s in settings]
    ig_fast = metric.integrated_gradients(steps=2)
    assert not calls  # block 0 never ran: the forwards started after block 1
    metric.batches = [replace(b, prefix=None) for b in metric.batches]
    full = [metric.evaluate(s) for s in settings]
    ig_full = metric.integrated_gradients(steps=2)
    assert calls  # the full forwards did run it
    first.remove()
    for a, b in zip(fast, full):
        np.testing.assert_array_equal(a, b)  # the same computation from the same input: to the last bit
    assert np.ptp(np.array(fast), axis=0).max() > 1e-3  # the settings differ: the comparison is not vacuous
    for layer in saes:
        np.testing.assert_allclose(ig_fast[layer][0], ig_full[layer][0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(ig_fast[layer][1], ig_full[layer][1], rtol=1e-4, atol=1e-7)
    assert all("forward" not in vars(block) for block in metric.skipped)  # the blocks' own forward is back


def test_the_skipped_blocks_get_their_own_forward_back_after_an_error():
    from irmprobe.validation.attribution import _starting_after

    _, tuned = _tiny("llama")
    blocks = list(tuned.model.layers[:2])
    own = blocks[0].forward  # a forward of its own, as accelerate's hooks set one
    blocks[0].forward = own
    with pytest.raises(RuntimeError, match="mid-forward"):
        with _starting_after(blocks, (torch.zeros(1, 3, 32), None)):
            assert blocks[1].forward() is not blocks[0].forward()  # the last block returns a copy
            raise RuntimeError("mid-forward")
    assert vars(blocks[0])["forward"] is own and "forward" not in vars(blocks[1])


def test_the_decision_view_on_change_dictionaries_fits_a_planted_bilinear_log_ratio():
    """r_t planted as change feature 0 at t-1 times its decoder direction's direct effect on the written token: the
    view on the dictionary of the change fits it out of fold, ranks feature 0 first, and its token values rank the
    tokens like an RM valuing that effect; shifted by one row (features at t, not t-1) it could not."""
    from types import SimpleNamespace

    from irmprobe.pipeline.stages.attribute import change_decision_view

    rng = np.random.default_rng(0)
    d, m, vocab, n_prompts, per, length, head = 16, 8, 60, 40, 3, 14, 3
    dirs = np.linalg.qr(rng.normal(size=(d, m)))[0].T.astype(np.float32)  # [m, d], orthonormal decoder rows
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=m))
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.from_numpy(dirs))
        sae.W_enc.copy_(torch.from_numpy(dirs.T.copy()))  # each feature reads its own direction of the change
    unembed = rng.normal(size=(vocab, d)).astype(np.float32)
    effect = (unembed - unembed.mean(0)) @ dirs[0]  # feature 0's direct effect on each token's logit
    seqs = [rng.integers(0, vocab, length) for _ in range(n_prompts * per)]
    for i in range(0, len(seqs), per):  # the sequences of a prompt share its first tokens
        for j in range(1, per):
            seqs[i + j][:head] = seqs[i][:head]
    seq_index = np.repeat(np.arange(len(seqs)), length)
    position = np.tile(np.arange(length), len(seqs))
    tokens = np.concatenate(seqs)
    coeffs = rng.exponential(1.0, (len(tokens), m)) * (rng.random((len(tokens), m)) < 0.5)
    base = rng.normal(size=(len(tokens), d)).astype(np.float32)
    tuned = base + (coeffs @ dirs).astype(np.float32)
    log_ratio = np.zeros(len(tokens))
    later = position > 0
    log_ratio[later] = 2.0 * coeffs[np.flatnonzero(later) - 1, 0] * effect[tokens[later]]
    log_ratio += rng.normal(0, 0.05, len(tokens))
    capture = SimpleNamespace(acts={"base.3": base, "tuned.3": tuned}, seq_index=seq_index, position=position,
                              token_ids=tokens, log_ratio=log_ratio.astype(np.float32))
    samples = SimpleNamespace(prompt_index=np.repeat(np.arange(n_prompts), per), token_ids=seqs,
                              prompts=["p"] * n_prompts, prompt_lens=np.full(len(seqs), head))
    rm = {int(t): float(effect[t]) for t in range(vocab)}
    view = change_decision_view(capture, samples, {3: sae}, [3], unembed, None, rm, seed=0)
    assert view["test_r2"] >= 0.8 and view["top"][0]["node"] == "L3/f0", view
    assert view["tau"] >= 0.5 and view["n_rows"] == int(np.sum(position >= head))
    # Beside it, the same fit with the targets shuffled within each training fold: no pairing, no fit.
    assert len(view["shuffled"]["test_r2"]) == len(view["shuffled"]["tau"]) == 3
    assert all(r2 is None or r2 <= 0.05 for r2 in view["shuffled"]["test_r2"]), view["shuffled"]
    assert len(set(view["shuffled"]["test_r2"])) > 1  # three permutations, not one
    # The same target one row later: the features at t-1 no longer hold what r_t reads.
    shifted = SimpleNamespace(**{**vars(capture), "log_ratio": np.roll(capture.log_ratio, 1)})
    assert change_decision_view(shifted, samples, {3: sae}, [3], unembed, None, rm, seed=0)["test_r2"] <= 0.2
    with pytest.raises(ValueError, match=r"block\(s\) \[5\]"):
        change_decision_view(capture, samples, {3: sae}, [3, 5], unembed, None, rm, seed=0)
    prompts_only = SimpleNamespace(**{**vars(samples), "prompt_lens": np.full(len(seqs), length)})
    with pytest.raises(ValueError, match="nothing to score"):
        change_decision_view(capture, prompts_only, {3: sae}, [3], unembed, None, rm, seed=0)


def test_the_change_design_is_sparse_and_equals_the_dense_one_where_features_fire_on_no_change():
    """A dictionary of the change whose biases make some features fire on no change: the sparse design equals
    (f - f0) times each feature's direct effect on the written token, computed densely."""
    from irmprobe.analysis.views import bilinear_inputs
    from irmprobe.pipeline.stages.attribute import change_bilinear_inputs
    from irmprobe.saes.evaluate import decoder_directions, encode, zero_input_features

    rng = np.random.default_rng(1)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=12))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(16, 12))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(12, 16), dim=-1))
        sae.b_enc.copy_(torch.tensor([0.5, 0.0, 0.3] + [-0.2] * 9))  # features 0 and 2 fire on no change
        sae.b_dec.zero_()
    delta = rng.normal(size=(50, 16)).astype(np.float32)
    written, unembed, gamma = rng.integers(0, 30, 50), rng.normal(size=(30, 16)), rng.uniform(0.5, 2, 16)
    zero = zero_input_features(sae)
    assert np.flatnonzero(zero).tolist() == [0, 2]
    dense = bilinear_inputs(encode(sae, delta).toarray() - zero[None, :], written, decoder_directions(sae), unembed,
                            gamma)
    sparse = change_bilinear_inputs(sae, delta, written, unembed, gamma)
    assert sp.issparse(sparse) and sparse.nnz < 0.8 * dense.size  # zeros where a feature is off and f0 is 0
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-5, atol=1e-6)
