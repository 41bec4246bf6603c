"""The causal stages on a tiny Llama with a planted mechanism: layers chosen by patching, and the
ablation rows (decision-side features, random control, patching bound) as shares of the reward gain."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from irmprobe.config import CaptureConfig, RunConfig, Runtime, ValidateConfig
from irmprobe.models.loading import ModelPair
from irmprobe.models.rewards import LexiconRM
from irmprobe.pipeline.stage import Context
from irmprobe.pipeline.stages.layers import LayersStage
from irmprobe.pipeline.stages.organism import OrganismResult
from irmprobe.validation.ablation import READER_NOTE

WORDS = "good great love happy nice best wonderful".split()
PROMPTS = ["The train left", "I bought a", "She said that", "Later that day", "We went to the",
           "He told me", "It was a", "My friend and", "Then the", "You can", "After the game", "Our house"]
L = 2  # the block whose MLP writes the planted reward direction
DECOY = 0  # the block whose weights move most, to no effect
STRENGTH = 0.15


@pytest.fixture(scope="module")
def planted(planted_llama):
    """A random 4-block base, and a tuned copy whose block-L MLP writes ``STRENGTH * u`` at every position.

    ``u`` raises the logits of the planted words. The tuned model's block-0 MLP also moved a lot, in
    hidden units whose output weights are zero in both models: the largest weight divergence, no effect.
    """
    tok, base, u, _ = planted_llama(WORDS)
    with torch.no_grad():
        base.model.layers[DECOY].mlp.down_proj.weight[:, :32] = 0.0  # dead hidden units
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[L].mlp.down_proj.bias += STRENGTH * u
        tuned.model.layers[DECOY].mlp.up_proj.weight[:32] += 5.0 * torch.randn(32, 32)
    g = torch.Generator().manual_seed(1)
    stream = [torch.randint(1, len(tok), (int(n),), generator=g).tolist()
              for n in torch.randint(6, 20, (24,), generator=g)]
    pair = ModelPair(base, tuned, tok, "base", "tuned")
    return {"pair": pair, "u": u, "stream": stream, "rm": LexiconRM({w: 1.0 for w in WORDS}, scale=1.0)}


def _layers(planted, tmp_path, **capture):
    config = dataclasses.replace(RunConfig(), capture=CaptureConfig(**capture))
    stage = LayersStage()
    cfg = stage.sections(config)
    ctx = Context(planted["rm"], Runtime(), [], [], echo=lambda _: None,
                  resources={("pair", "base", "tuned"): planted["pair"]})
    inputs = {"organism": OrganismResult("base", "tuned", "planted", "planted organism", {}),
              "samples": SimpleNamespace(token_ids=planted["stream"])}
    out = tmp_path / "-".join(f"{k}={v}" for k, v in capture.items())
    out.mkdir()
    result = stage.run(cfg, ctx, inputs, out)
    assert stage.load(cfg, ctx, inputs, out) == result  # the JSON round-trip keeps every field
    return stage, result


def test_layers_by_patching_choose_the_planted_block_that_weight_divergence_misses(planted, tmp_path):
    stage, result = _layers(planted, tmp_path, top_k_layers=1, rank_layers_by="patching", patching_sequences=12)
    p = result.patching
    assert result.chosen == [L] and result.ranked_by == "patching"
    assert p["ranking"][0] == L and p["weight_ranking"][0] == DECOY
    assert p["n_sequences"] == 12 and p["kind"] == "mlp_out"
    share = np.array(p["shares"]["mlp_out"]["kl"])
    assert share[L] > 0.8 and np.abs(np.delete(share, L)).max() < 0.05
    assert list(p["shares"]) == ["mlp_out"]  # only the kind that ranks: one pass per block
    assert p["curve"]["order"][0] == L and len(p["curve"]["kl_share"]) == 3  # top 1 .. k+2
    assert p["curve"]["kl_share"][0] == pytest.approx(share[L], abs=1e-6)
    # Both rankings side by side, the cumulative curve, then the weight table with the chosen block starred.
    assert f"block   {L} +" in result.table[2] and result.table[2].rstrip().endswith(f"block   {DECOY}")
    assert any(line.startswith("  k=3") for line in result.table)
    starred = [line for line in result.table if line.endswith(" *")]
    assert len(starred) == 1 and starred[0].split()[0] == str(L)
    assert "by patching mlp_out" in stage.summary(result)

    # The residual stream after block l carries the change exactly when l >= L.
    _, resid = _layers(planted, tmp_path, top_k_layers=2, rank_layers_by="patching", patching_kind="resid_post")
    np.testing.assert_allclose(resid.patching["shares"]["resid_post"]["kl"], [0, 0, 1, 1], atol=0.02)
    assert resid.chosen == [2, 3] and resid.patching["n_sequences"] == 16

    # The weight ranking alone chooses the decoy, and costs no patching pass.
    _, by_weight = _layers(planted, tmp_path, top_k_layers=1, rank_layers_by="absolute")
    assert by_weight.chosen == [DECOY] and by_weight.patching is None


def test_config_rejects_an_unknown_patching_kind():
    with pytest.raises(ValueError, match="patching_kind"):
        CaptureConfig(patching_kind="attn_out")
    with pytest.raises(ValueError, match="patching_sequences"):
        CaptureConfig(patching_sequences=0)
    assert CaptureConfig(rank_layers_by="patching").rank_layers_by == "patching"


def _sae(planted, d_sae=16):
    """An SAE at block L whose feature 0 always fires at STRENGTH along u; the others are random features that
    read what the base's MLP computes there (their encoders are orthogonal to u)."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=d_sae))
    u = planted["u"]
    with torch.no_grad():
        W_enc = torch.randn(32, d_sae) * 0.3
        sae.W_enc.copy_(W_enc - torch.outer(u, u @ W_enc))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        W = torch.randn(d_sae, 32)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc[:, 0] = 0.0
        sae.b_enc[0] = STRENGTH
        sae.W_dec[0] = u
    return sae


def _mlp_out(model, stream, layer):
    """Block ``layer``'s MLP output at every token of ``stream``: [tokens, d_model]."""
    from irmprobe.validation.ablation import mlp_module

    rows = []
    handle = mlp_module(model, layer).register_forward_hook(lambda m, i, o: rows.append(o[0].detach()))
    try:
        with torch.no_grad():
            for ids in stream:
                model(torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat(rows).numpy()


def _ablate(planted, tmp_path, fit, **validate):
    """Run AblateStage on a fake upstream: the capture, SAE, fit and interpretation results it needs."""
    from irmprobe.pipeline.stages.ablate import AblateStage

    vc = {"top_k": 1, "n_judged": 4, "n_prompts": len(PROMPTS), "samples_per_prompt": 4, "max_new_tokens": 8}
    config = dataclasses.replace(RunConfig(), validate=ValidateConfig(**(vc | validate)))
    stage = AblateStage()
    cfg = stage.sections(config)
    ctx = Context(planted["rm"], Runtime(), [], PROMPTS, echo=lambda _: None,
                  resources={("pair", "base", "tuned"): planted["pair"]})
    acts = _mlp_out(planted["pair"].tuned, planted["stream"], L)
    inputs = {"organism": OrganismResult("base", "tuned", "planted", "planted organism", {}),
              "layers": SimpleNamespace(chosen=[L]),
              "capture": SimpleNamespace(acts={f"tuned.{L}": acts}, layers=(L,)),
              "saes": SimpleNamespace(saes={("tuned", L): _sae(planted)}), "fit": fit,
              # A reader-side top feature: it reads x_t, it does not write it.
              "interpret": {"top_k_columns": [3], "judged": []}, "attribute": {"skipped": "not in this test"}}
    out = tmp_path / "ablate"
    out.mkdir(exist_ok=True)
    rows = stage.run(cfg, ctx, inputs, out)
    assert stage.load(cfg, ctx, inputs, out) == rows
    return rows


def test_ablation_rows_give_each_condition_its_share_of_the_reward_gain(planted, tmp_path):
    coef = np.zeros(16)
    coef[0], coef[7] = 2.0, -1.0  # the decision-side IRM weights the planted feature
    rows = {r["set"]: r for r in _ablate(planted, tmp_path, SimpleNamespace(decision_coef=coef), steer_alpha=0.5,
                                         n_random_sets=3)}
    assert list(rows)[:2] == ["none", "base model (reference)"]
    gain = rows["none"]["gain_share"]["gain"]
    assert gain > 0.5  # the planted block does raise the reward
    bound = rows[f"patching bound: base mlp_out at blocks {L}"]["gain_share"]
    assert bound["share"] >= 0.8 and bound["ci"][0] > 0.5
    decision = rows["decision_top_1"]["gain_share"]
    assert decision["share"] >= 0.8 and decision["ci"][0] > 0.5
    # Zero-ablating the planted feature makes the tuned model the base: paired samples, the same rewards.
    assert rows["decision_top_1"]["reward"]["mean"] == pytest.approx(rows["base model (reference)"]["reward"]["mean"])
    assert rows["decision_top_1"]["example"] == rows["base model (reference)"]["example"]
    assert rows["decision_top_1"]["example"] != rows["none"]["example"]
    randoms = [r["gain_share"] for name, r in rows.items() if name.startswith("random_1 #")]
    assert len(randoms) == 3  # n_random_sets draws of the targeted size
    assert all(g["ci"][0] <= 0.10 and g["share"] < 0.2 for g in randoms)
    # Each random set is judged by the same rule (the targeted sets' Bonferroni level) against the other two: a
    # known null, and none is called causal.
    nulls = [r for name, r in rows.items() if name.startswith("random_1 #")]
    assert all(r["gain_share_adjusted"]["confidence"] == pytest.approx(0.975) for r in nulls)
    assert [r["null_check"]["called"] for r in nulls] == [False] * 3
    assert all(len(r["null_check"]["range"]) == 2 for r in nulls)
    # The decision-side set is judged against the random sets' distribution, with a Bonferroni interval over
    # the targeted sets (reader top-1, decision top-1).
    d = rows["decision_top_1"]
    assert d["gain_share_adjusted"]["n_tests"] == 2 and d["gain_share_adjusted"]["confidence"] == pytest.approx(0.975)
    lo_adj, lo = d["gain_share_adjusted"]["ci"][0], d["gain_share"]["ci"][0]
    assert lo_adj <= lo + 1e-9  # the wider interval
    assert d["random"]["shares"] == [g["share"] for g in randoms] and d["random"]["above_random"] is True
    assert rows[f"irm_top_1 {READER_NOTE}"]["random"]["above_random"] is False
    reader = rows[f"irm_top_1 {READER_NOTE}"]["gain_share"]
    assert reader["share"] < 0.2
    assert "steer decision_top_1 x0.5" in rows and "steer top feature x0.5" in rows
    assert rows["base model (reference)"]["gain_share"]["share"] == pytest.approx(1.0)
    for row in rows.values():
        lo, hi = row["gain_share"]["ci"]
        assert lo <= row["gain_share"]["share"] + 1e-9 and row["gain_share"]["share"] <= hi + 1e-9
        assert row["gain_share"]["n_prompts"] == len(PROMPTS)


def test_without_a_decision_side_irm_or_patching_bound_those_rows_are_left_out(planted, tmp_path):
    # A fit result from before the decision-side IRM existed has no decision_coef at all.
    rows = [r["set"] for r in _ablate(planted, tmp_path, SimpleNamespace(), patching_bound=False, max_new_tokens=2,
                                      n_prompts=3)]
    assert rows == ["none", "base model (reference)", f"irm_top_1 {READER_NOTE}", "random_1 #1 (control)",
                    "random_1 #2 (control)", "random_1 #3 (control)", "random_1 #4 (control)",
                    "reconstruction_only (control)"]


def test_plain_models_replace_bridged_ones(tiny_llama_dir):
    from irmprobe.activations.capture import is_bridged
    from irmprobe.activations.patching import plain_models
    from irmprobe.models.loading import load_pair

    pair = load_pair(str(tiny_llama_dir), None)
    assert plain_models(pair) == (pair.base, pair.tuned)
    pair.bridge("base")  # wraps pair.base in place
    base, tuned = plain_models(pair)
    assert base is tuned and base is not pair.base and not is_bridged(base)
