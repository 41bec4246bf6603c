"""Ablation by splicing an SAE with the error term kept, on tiny models with a planted feature."""

import numpy as np
import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from irmprobe.models.loading import load_pair
from irmprobe.models.rewards import LexiconRM
from irmprobe.validation.ablation import FeatureSet, ablated, ablation_table


def _sae(d_in, d_sae=16, seed=0, planted=None, strength=0.0):
    """A random SAE; optionally feature 0 always fires at ``strength`` along direction ``planted``."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) * 0.3)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        W = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        if planted is not None:
            sae.W_enc[:, 0] = 0.0
            sae.b_enc[0] = strength
            sae.W_dec[0] = planted / planted.norm()
    return sae


def test_splice_with_nothing_ablated_reproduces_the_logits(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    model, sae = pair.base, _sae(pair.d_model)
    ids = torch.tensor([[5, 9, 17, 33, 2, 8, 40]])
    with torch.no_grad():
        clean = model(ids).logits
        with ablated(model, {1: sae}, FeatureSet("nothing", {1: ()})):
            same = model(ids).logits
        with ablated(model, {1: sae}, FeatureSet("recon", {}, mode="reconstruction")):
            recon = model(ids).logits
        with ablated(model, {1: sae}, FeatureSet("all", {1: tuple(range(16))})):
            every = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, clean, atol=0, rtol=0)  # the hooks are gone after the block
    assert (recon - clean).abs().max() > 1e-3  # the hook is live: dropping the error changes the logits
    assert (every - clean).abs().max() > 1e-3  # zero-ablating every feature leaves only the error term
    with pytest.raises(ValueError, match="mode must be"):
        FeatureSet("x", {}, mode="erase")
    with pytest.raises(ValueError, match="needs the features' mean"):
        FeatureSet("x", {}, mode="mean")


def test_ablation_restricted_to_rows_changes_those_rows_only(tiny_llama_dir):
    pair = load_pair(str(tiny_llama_dir), None)
    model, sae = pair.base, _sae(pair.d_model)
    ids = torch.tensor([[5, 9, 17, 33, 2], [8, 40, 3, 7, 11], [5, 9, 17, 33, 2], [8, 40, 3, 7, 11]])
    every = FeatureSet("all", {1: tuple(range(16))})
    with torch.no_grad():
        clean = model(ids).logits
        with ablated(model, {1: sae}, every):
            whole = model(ids).logits
        with ablated(model, {1: sae}, every, rows=slice(2, 4)):
            half = model(ids).logits
    torch.testing.assert_close(half[:2], clean[:2], atol=0, rtol=0)  # rows outside the slice untouched
    torch.testing.assert_close(half[2:], whole[2:], atol=1e-5, rtol=0)  # rows inside ablated as in a whole batch
    assert (half[2:] - clean[2:]).abs().max() > 1e-3


def _mlp_out_under(model, sae, feature_set, ids):
    """Block 1's MLP output without and with ``feature_set`` spliced in, from one forward pass."""
    from irmprobe.validation.ablation import mlp_module

    seen = {}
    mlp = mlp_module(model, 1)
    before = mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach().double()))
    try:
        with ablated(model, {1: sae}, feature_set):  # its hook runs after ``before`` and before ``after``
            after = mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("spliced", o.detach().double()))
            try:
                with torch.no_grad():
                    model(ids)
            finally:
                after.remove()
    finally:
        before.remove()
    return seen["x"][0], seen["spliced"][0]


@pytest.mark.parametrize("mode", ["zero", "mean", "reconstruction", "steer"])
def test_splice_is_exactly_x_minus_the_ablated_features_contributions(tiny_llama_dir, mode):
    """x' = x - sum_{i in S} (f_i(x) - v_i) d_i, against f computed here from the SAE's weights."""
    model = load_pair(str(tiny_llama_dir), None).base
    d_model = model.config.hidden_size
    sae = _sae(d_model, d_sae=16, seed=3)
    with torch.no_grad():  # biases make the reference computation show that it handles them
        sae.b_enc.copy_(torch.linspace(-0.05, 0.05, 16))
        sae.b_dec.copy_(0.01 * torch.randn(d_model))
    S = (2, 5, 11)
    means = np.linspace(0.1, 1.6, 16)
    fs = {"zero": FeatureSet("z", {1: S}), "mean": FeatureSet("m", {1: S}, "mean", {1: means}),
          "reconstruction": FeatureSet("r", {}, "reconstruction"),
          "steer": FeatureSet("s", {1: S}, "steer", alpha=2.5)}[mode]
    x, spliced = _mlp_out_under(model, sae, fs, torch.tensor([[5, 9, 17, 33, 2, 8, 40]]))
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    f = torch.relu((x - b_dec * sae.cfg.apply_b_dec_to_input) @ W_enc + b_enc)  # [pos, d_sae]
    assert (f[:, list(S)] > 0).sum() >= 3  # the ablated features do fire: the identity is not vacuous
    expected = x.clone()
    if mode == "reconstruction":
        expected = f @ W_dec + b_dec
    for i in S:
        if mode == "steer":
            expected = expected + 2.5 * W_dec[i]
        elif mode in ("zero", "mean"):
            v = 0.0 if mode == "zero" else means[i]
            expected = expected - (f[:, i:i + 1] - v) * W_dec[i]
    assert (expected - x).abs().max() > 1e-2
    torch.testing.assert_close(spliced, expected, atol=1e-5, rtol=1e-5)


def test_ablating_the_planted_reward_feature_lowers_reward_and_random_features_do_not(tiny_neox_dir, tmp_path):
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_neox_dir)
    from tests.conftest import LEXICON_WORDS

    word = next(w for w in LEXICON_WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    good = tok(" " + word, add_special_tokens=False)["input_ids"]
    model = GPTNeoXForCausalLM.from_pretrained(tiny_neox_dir)
    with torch.no_grad():  # a random tiny model's logits are near-uniform: sharpen the unembedding
        model.get_output_embeddings().weight *= 100.0
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # Plant the reward: the last MLP always writes a direction that makes the model say " good".
    direction = model.get_output_embeddings().weight[good[0]].detach().clone()
    direction -= direction.mean()
    strength = 8.0
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.bias += strength * direction / direction.norm()
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    pair = load_pair(str(tmp_path / "base"), str(tmp_path / "tuned"))
    sae = _sae(pair.d_model, planted=direction, strength=strength)
    rm = LexiconRM({word: 3.0}, name="planted")
    prompts = ["The train left", "I bought a", "She said that", "Later that day"]
    kw = dict(samples_per_prompt=6, max_new_tokens=8, seed=0)
    base_rows = ablation_table(pair.base, pair.tokenizer, {1: sae}, [], rm, prompts, **kw)
    rows = ablation_table(pair.tuned, pair.tokenizer, {1: sae},
                          [FeatureSet("planted", {1: (0,)}), FeatureSet("random", {1: (5, 9, 12)})], rm, prompts, **kw)
    by = {r["set"]: r for r in rows}
    clean = by["none"]["reward"]["mean"]
    assert clean > base_rows[0]["reward"]["mean"] + 1.0  # the planted feature does carry the reward
    assert by["planted"]["change"]["ci"][1] < 0  # ablating it lowers reward, the CI excludes 0
    assert by["planted"]["reward"]["mean"] < 0.5 * clean
    assert abs(by["random"]["change"]["mean"]) < 0.2 * clean  # random features barely matter


def test_sampling_refuses_a_bridged_model(tiny_llama_dir):
    from irmprobe.activations.samples import sample_continuations

    pair = load_pair(str(tiny_llama_dir), None)
    pair.bridge("base")  # wraps pair.base in place
    with pytest.raises(ValueError, match="TransformerBridge has wrapped"):
        sample_continuations(pair.base, pair.tokenizer, ["Hello"], n_per_prompt=1, max_new_tokens=2, batch_size=1,
                             seed=0)


def test_an_undefined_gain_share_interval_is_printed_and_concluded_from_as_undefined():
    from irmprobe.analysis.verdict import ablation_lines
    from irmprobe.reporting.summary import _interval

    share = lambda s, ci: {"share": s, "ci": ci}  # noqa: E731
    rows = [{"set": "none", "n_features": 0, "gain_share": share(0.0, [0.0, 0.0])},
            {"set": "irm_top_10", "n_features": 10, "gain_share": share(0.4, [None, None])},
            {"set": "decision_top_10", "n_features": 10, "gain_share": share(0.6, [0.5, 0.7])},
            {"set": "random_10 (control)", "n_features": 10, "gain_share": share(0.1, [None, 0.2])}]
    lines = ablation_lines({"ablation": rows})
    assert lines[0] == ("irm_top_10 removes +0.40 of the gain; its interval is undefined (resamples of the prompts "
                        "with no reward gain), so nothing is concluded from it.")
    assert lines[1] == "decision_top_10 removes +0.60 [+0.50, +0.70] of the gain."  # no random sets
    assert _interval([None, 0.2], "+.2f") == "undefined" and _interval([0.1, 0.2], "+.2f") == "[+0.10,+0.20]"


def test_a_fresh_gain_share_with_no_gain_in_some_resamples_has_an_undefined_interval():
    from irmprobe.analysis.verdict import ablation_lines
    from irmprobe.validation.ablation import gain_share_row

    # Prompt 0 gains, prompts 1-2 gain nothing: resamples of prompts 1-2 only have no gain to share (0/0).
    base = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    tuned = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    ablated_r = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 2.0])
    row = gain_share_row(base, tuned, ablated_r, np.array([0, 0, 1, 1, 2, 2]))
    assert row["share"] == pytest.approx(0.5) and row["ci"] == [None, None]
    none = gain_share_row(base, tuned, tuned, np.array([0, 0, 1, 1, 2, 2]))
    lines = ablation_lines({"ablation": [{"set": "none", "n_features": 0, "gain_share": none},
                                          {"set": "patching bound: base mlp_out at blocks 1", "n_features": 0,
                                           "gain_share": row}]})
    assert lines == ["patching bound: base mlp_out at blocks 1 removes +0.50 of the gain; its interval is undefined "
                     "(resamples of the prompts with no reward gain), so nothing is concluded from it."]
    assert gain_share_row(base, base, base, np.array([0, 0, 1, 1, 2, 2])) is None  # no gain at all


def test_the_ablation_refuses_shares_of_a_gain_whose_interval_includes_zero():
    from irmprobe.analysis.verdict import ablation_lines
    from irmprobe.validation.ablation import reward_gain_test

    prompts = np.repeat(np.arange(10), 2)
    base = np.zeros(20)
    noisy = np.tile([1.0, -1.0], 10) + np.repeat(np.r_[0.3, -0.3, 0.2, -0.1, 0.0, 0.1, -0.2, 0.3, -0.3, 0.1], 2)
    test = reward_gain_test(base, noisy, prompts)
    assert test["ci"][0] < 0 < test["ci"][1] and not test["positive"]
    lines = ablation_lines({"ablation": [{"set": "none", "n_features": 0, "gain_share": None, "gain_test": test},
                                          {"set": "decision_top_10", "n_features": 10, "gain_share": None}]})
    assert len(lines) == 1 and "not significantly positive" in lines[0] and "no share" in lines[0]
    clear = reward_gain_test(base, np.tile([1.0, 0.8], 10) + 0.1 * np.repeat(np.arange(10) % 3, 2), prompts)
    assert clear["positive"] and clear["ci"][0] > 0.5
    # Samples of one prompt are one unit: 2 prompts of 50 samples each are 2 units, not 100.
    few = reward_gain_test(np.zeros(100), np.r_[np.ones(50), -0.5 * np.ones(50)], np.repeat([0, 1], 50))
    assert few["n_prompts"] == 2 and not few["positive"]


def test_a_targeted_set_is_causal_only_when_its_bonferroni_interval_clears_the_random_sets_range():
    from irmprobe.analysis.verdict import ablation_lines
    from irmprobe.validation.ablation import against_random

    share = lambda s, ci: {"share": s, "ci": ci}  # noqa: E731
    rows = [{"set": "none", "n_features": 0, "gain_share": share(0.0, [0.0, 0.0])},
            {"set": "decision_top_10", "n_features": 10, "gain_share": share(0.8, [0.6, 0.95]),
             "gain_share_adjusted": {"ci": [0.55, 0.97], "confidence": 0.975, "n_tests": 2}},
            {"set": "attribution_top_10", "n_features": 10, "gain_share": share(0.5, [0.3, 0.7]),
             "gain_share_adjusted": {"ci": [0.2, 0.75], "confidence": 0.975, "n_tests": 2}}]
    rows += [{"set": f"random_10 #{i + 1} (control)", "n_features": 10, "gain_share": share(s, [s - 0.2, s + 0.2])}
             for i, s in enumerate([0.05, -0.1, 0.3, 0.1])]
    rows = against_random(rows, ("decision_top_10", "attribution_top_10"))
    assert rows[1]["random"]["shares"] == [0.05, -0.1, 0.3, 0.1]
    assert rows[1]["random"]["range"][1] == pytest.approx(np.percentile([0.05, -0.1, 0.3, 0.1], 97.5))
    assert rows[1]["random"]["above_random"] is True  # 0.55 > 0.29
    assert rows[2]["random"]["above_random"] is False  # 0.20 < 0.29: the unadjusted 0.30 would have cleared it
    lines = ablation_lines({"ablation": rows})
    assert lines[0].endswith("wholly above them: these features carry the reward causally.")
    assert "97.5% interval (Bonferroni over 2 targeted sets) is [+0.55, +0.97]" in lines[0]
    assert lines[1].endswith("not above them.")


def test_the_causal_rule_is_applied_to_each_random_set_against_the_others_as_a_known_null():
    from irmprobe.analysis.verdict import ablation_lines, null_calls
    from irmprobe.validation.ablation import against_random

    share = lambda s, ci: {"share": s, "ci": ci}  # noqa: E731
    adjusted = lambda ci: {"ci": ci, "confidence": 0.975, "n_tests": 2}  # noqa: E731
    reward = {"mean": 0.0, "ci": [0.0, 0.0]}
    rows = [{"set": "none", "mode": "-", "n_features": 0, "reward": reward, "change": None,
             "gain_share": share(0.0, [0.0, 0.0])},
            {"set": "decision_top_10", "mode": "zero", "n_features": 10, "reward": reward, "change": None,
             "gain_share": share(0.8, [0.6, 0.95]), "gain_share_adjusted": adjusted([0.55, 0.97])}]
    # Shares 0.05, -0.1, 0.3, 0.1; the third's Bonferroni interval [0.26, 0.34] lies above the others' range
    # (at most 0.1), so the rule calls that random set causal: a false call. The first's [-0.2, 0.3] does not.
    for i, (s, ci) in enumerate([(0.05, [-0.2, 0.3]), (-0.1, [-0.3, 0.1]), (0.3, [0.26, 0.34]), (0.1, [-0.1, 0.3])]):
        rows.append({"set": f"random_10 #{i + 1} (control)", "mode": "zero", "n_features": 10, "reward": reward,
                     "change": None, "gain_share": share(s, [s - 0.2, s + 0.2]), "gain_share_adjusted": adjusted(ci)})
    # A size with two random sets only: each would be judged against one other set, so it is not judged.
    for i, s in enumerate([0.0, 0.1]):
        rows.append({"set": f"random_3 #{i + 1} (control)", "mode": "zero", "n_features": 3, "reward": reward,
                     "change": None, "gain_share": share(s, [s - 0.1, s + 0.1]),
                     "gain_share_adjusted": adjusted([s - 0.2, s + 0.2])})
    rows = against_random(rows, ("decision_top_10",))
    randoms = [r for r in rows if r["set"].startswith("random_10")]
    assert [r["null_check"]["called"] for r in randoms] == [False, False, True, False]
    assert randoms[2]["null_check"]["range"][1] == pytest.approx(np.percentile([0.05, -0.1, 0.1], 97.5))
    assert not any("null_check" in r for r in rows if r["set"].startswith("random_3"))
    # The targeted set is still judged against all four random sets.
    assert rows[1]["random"]["shares"] == [0.05, -0.1, 0.3, 0.1] and rows[1]["random"]["above_random"] is True
    null = null_calls(rows)
    assert null["called"] == 1 and null["n"] == 4 and null["sizes"] == {10: [1, 4]}
    # The called set's lower end 0.26 against the others' upper 0.0975.
    assert null["closest"] == pytest.approx(0.26 - np.percentile([0.05, -0.1, 0.1], 97.5))
    assert ablation_lines({"ablation": rows})[-1] == (
        "known nulls: the same rule, applied to each random set against the other random sets of its size, called 1 "
        "of 4 causal (1 of 4 10-feature sets; the highest lower end cleared the others' range by 0.16); these checks "
        "are not independent within a size, so 1/4 is a rough false-call rate.")
    from irmprobe.reporting.tracking import _causal_rule

    table = (["causal_rule"], [[r["set"], _causal_rule(r)] for r in rows])
    rule = {row[0]: row[-1] for row in table[1]}
    assert table[0][-1] == "causal_rule" and rule["decision_top_10"] == "causal"
    assert rule["random_10 #3 (control)"] == "false call" and rule["random_10 #1 (control)"] == "no call (a random set)"
    assert rule["none"] is None and null_calls(rows[:2]) is None


def test_an_sae_is_spliced_at_its_own_hook_point(tiny_llama_dir):
    """An SAE trained on resid_post is spliced at the block's output, not at its MLP's: the block output becomes
    x - f_S(x) d_S there, and the MLP's output is left alone."""
    from irmprobe.activations.capture import hook_module

    model = load_pair(str(tiny_llama_dir), None).base
    sae = _sae(model.config.hidden_size, d_sae=16, seed=5)
    S = (1, 4, 9)
    seen = {}

    def keep(name):
        return lambda m, i, o: seen.__setitem__(name, (o[0] if isinstance(o, tuple) else o).detach().double())

    block, mlp = hook_module(model, "blocks.1.hook_resid_post"), hook_module(model, "blocks.1.hook_mlp_out")
    ids = torch.tensor([[5, 9, 17, 33, 2, 8, 40]])
    handles = [block.register_forward_hook(keep("x")), mlp.register_forward_hook(keep("mlp"))]
    with torch.no_grad():
        model(ids)
    clean_mlp = seen["mlp"]
    with ablated(model, {1: sae}, FeatureSet("z", {1: S}), site="resid_post"):
        handles.append(block.register_forward_hook(keep("spliced")))
        with torch.no_grad():
            model(ids)
    for h in handles:
        h.remove()
    x = seen["x"][0]
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    f = torch.relu((x - b_dec * sae.cfg.apply_b_dec_to_input) @ W_enc + b_enc)
    assert (f[:, list(S)] > 0).sum() >= 3
    torch.testing.assert_close(seen["spliced"][0], x - f[:, list(S)] @ W_dec[list(S)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["mlp"], clean_mlp, atol=0, rtol=0)


def _identity_change_dictionary(d):
    """A dictionary of the change that reconstructs every change exactly: features relu(+x_k) and relu(-x_k)."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_a_change_feature_is_set_to_its_value_on_a_zero_change():
    """change_mix: x_tuned - (f_S(x_tuned - x_base) - f_S(0)) d_S, biases included; all of an exact dictionary
    ablated gives the base's activation, none the tuned one."""
    from irmprobe.validation.ablation import change_mix

    d = 12
    sae = _sae(d, d_sae=20, seed=7)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.2, 0.3, 20))
        sae.b_dec.copy_(0.3 * torch.randn(d))
    g = torch.Generator().manual_seed(1)
    x_base, x_tuned = torch.randn(3, 5, d, generator=g), torch.randn(3, 5, d, generator=g)
    S = [0, 3, 8, 15]

    def f(x):
        return torch.relu((x.double() - sae.b_dec.double() * sae.cfg.apply_b_dec_to_input) @ sae.W_enc.double()
                          + sae.b_enc.double())

    delta = f(x_tuned - x_base)[..., S] - f(torch.zeros(d))[S]
    assert delta.abs().max() > 0.1 and f(torch.zeros(d))[S].abs().max() > 0  # biases give f(0) != 0
    expected = x_tuned.double() - delta @ sae.W_dec.detach().double()[S]
    torch.testing.assert_close(change_mix(sae, S)(x_base, x_tuned).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(change_mix(sae, [])(x_base, x_tuned), x_tuned)
    exact = _identity_change_dictionary(d)
    torch.testing.assert_close(change_mix(exact, range(2 * d))(x_base, x_tuned), x_base, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="mode=change needs the dictionary of the change of every layer"):
        FeatureSet("c", {1: (0,)}, "change")


class _TextRM:
    """A reward that is a fixed function of the text: equal rewards everywhere mean equal texts."""

    def score(self, texts):
        return [len(t) + sum(map(ord, t)) % 997 / 997 for t in texts]


def test_change_features_ablated_while_sampling_run_the_base_in_lockstep(tiny_llama_dir):
    """Every feature of an exact dictionary of the change at block 1's resid_post, set to its zero-change value
    while the tuned model samples, is the base's block-1 output patched in: the same texts as the patching
    bound, sampled in the same batches; none of them is the tuned model."""
    from irmprobe.validation.ablation import paired_rows
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)
    exact = {1: _identity_change_dictionary(pair.d_model)}
    sets = [FeatureSet("every change feature", {1: tuple(range(2 * pair.d_model))}, "change", saes=exact),
            FeatureSet("no change feature", {1: ()}, "change", saes=exact)]
    prompts = ["one two three", "four five", "six seven eight nine", "ten"]
    rows = paired_rows(base, tuned, pair.tokenizer, {}, sets, _TextRM(), prompts, (1,), "resid_post",
                       samples_per_prompt=3, max_new_tokens=7, seed=4, batch_size=8)
    reward = {r["set"].split(":")[0]: r["reward"]["mean"] for r in rows}
    assert rows[2]["mode"] == "change" and rows[2]["n_features"] == 2 * pair.d_model
    assert reward["every change feature"] == pytest.approx(reward["patching bound"], abs=1e-12)
    assert reward["no change feature"] == pytest.approx(reward["none"], abs=1e-12)
    assert abs(reward["none"] - reward["patching bound"]) > 1e-3  # the two models do sample differently


def test_change_feature_sets_are_judged_against_random_change_features_only():
    """Random sets of one size but of two kinds (the tuned model's SAE features, features of a dictionary of the
    change) are two nulls: each targeted set meets its own kind, and the known-null count keeps them apart."""
    from irmprobe.analysis.verdict import null_calls
    from irmprobe.validation.ablation import against_random

    def row(name, mode, s, lo):
        return {"set": name, "mode": mode, "n_features": 10, "gain_share": {"share": s, "ci": [s - 0.2, s + 0.2]},
                "gain_share_adjusted": {"ci": [lo, s + 0.3], "confidence": 0.975, "n_tests": 2}}

    rows = [row("decision_top_10", "zero", 0.5, 0.3), row("attribution_change_faithful_10", "change", 0.5, 0.3)]
    rows += [row(f"random_10 #{i + 1} (control)", "zero", s, s - 0.3) for i, s in enumerate([0.0, 0.05, -0.05])]
    rows += [row(f"random_change_10 #{i + 1} (control)", "change", s, s - 0.3) for i, s in enumerate([0.4, 0.45, 0.5])]
    rows = against_random(rows, ("decision_top_10", "attribution_change_faithful_10"))
    assert rows[0]["random"]["shares"] == [0.0, 0.05, -0.05] and rows[0]["random"]["above_random"] is True
    assert rows[1]["random"]["shares"] == [0.4, 0.45, 0.5] and rows[1]["random"]["above_random"] is False
    null = null_calls(rows)
    assert null["sizes"] == {10: [0, 3], "10 change": [0, 3]} and null["n"] == 6
    from irmprobe.analysis.verdict import ablation_lines

    lines = ablation_lines({"ablation": [{"set": "none", "n_features": 0, "gain_share": {"share": 0.0, "ci": [0, 0]}}]
                            + rows})
    assert "3 random 10-feature sets of the same dictionaries of the change remove +0.40 to +0.50" in lines[1]
    assert "(0 of 3 10-feature sets, 0 of 3 10-feature sets of change features;" in lines[-1]


def test_random_change_sets_match_the_named_sets_count_at_each_hook_point():
    from irmprobe.validation.ablation import random_change_sets

    saes = {20: object(), 23: object()}
    named = FeatureSet("attribution_change_faithful_5", {23: (1, 2, 3, 4), 20: (7,)}, "change", saes=saes)
    live = {20: np.array([0, 3, 5, 9]), 23: np.arange(10, 40)}
    sets = random_change_sets(named, live, 6, np.random.default_rng(0))
    assert [fs.name for fs in sets] == [f"random_change_5 [b20:1 b23:4] #{i} (control)" for i in range(1, 7)]
    for fs in sets:
        assert {layer: len(idx) for layer, idx in fs.features.items()} == {20: 1, 23: 4}
        assert set(fs.features[20]) <= {0, 3, 5, 9} and set(fs.features[23]) <= set(range(10, 40))
        assert fs.mode == "change" and fs.saes is saes and fs.size == named.size
    assert len({fs.features[23] for fs in sets}) > 1  # drawn, not fixed
    said = []
    assert random_change_sets(named, {20: np.array([0]), 23: np.arange(3)}, 4, np.random.default_rng(0),
                              said.append) == []
    assert said == ["ablate: no random sets of change features for attribution_change_faithful_5; too few live "
                    "features at block 23 (3 for 4)"]


def test_change_sets_of_one_size_meet_random_sets_with_their_count_at_each_hook_point():
    """Two named sets of 10 change features, one all at block 27 and one spread over 27 and 28, are two nulls: each
    meets the random sets with its own count at each hook point, and the known-null count keeps them apart."""
    from irmprobe.analysis.verdict import ablation_lines, null_calls
    from irmprobe.validation.ablation import against_random

    def row(name, blocks, s, lo):
        return {"set": name, "mode": "change", "n_features": 10, "blocks": blocks,
                "gain_share": {"share": s, "ci": [s - 0.2, s + 0.2]},
                "gain_share_adjusted": {"ci": [lo, s + 0.3], "confidence": 0.975, "n_tests": 2}}

    rows = [row("attribution_change_faithful_10", "b27:10", 0.5, 0.3),
            row("decision_change_top_10", "b27:3 b28:7", 0.5, 0.3)]
    rows += [row(f"random_change_10 [b27:10] #{i + 1} (control)", "b27:10", s, s - 0.3)
             for i, s in enumerate([0.0, 0.05, -0.05])]
    rows += [row(f"random_change_10 [b27:3 b28:7] #{i + 1} (control)", "b27:3 b28:7", s, s - 0.3)
             for i, s in enumerate([0.4, 0.45, 0.5])]
    rows = against_random(rows, ("attribution_change_faithful_10", "decision_change_top_10"))
    assert rows[0]["random"]["shares"] == [0.0, 0.05, -0.05] and rows[0]["random"]["above_random"] is True
    assert rows[1]["random"]["shares"] == [0.4, 0.45, 0.5] and rows[1]["random"]["above_random"] is False
    null = null_calls(rows)
    assert null["sizes"] == {"10 change b27:10": [0, 3], "10 change b27:3 b28:7": [0, 3]} and null["n"] == 6
    lines = ablation_lines({"ablation": [{"set": "none", "n_features": 0, "gain_share": {"share": 0.0, "ci": [0, 0]}}]
                            + rows})
    assert lines[1].startswith("decision_change_top_10 removes +0.50")
    assert "3 random 10-feature sets of the same dictionaries of the change (b27:3 b28:7) remove +0.40 to +0.50" \
        in lines[1]
    assert "0 of 3 10-feature sets of change features (b27:10), 0 of 3 10-feature sets of change features " \
        "(b27:3 b28:7);" in lines[-1]


def test_the_decision_view_on_the_change_names_its_top_positive_features():
    from irmprobe.validation.ablation import decision_view_features

    view = {"top": [{"node": "L28/f5", "weight": 0.9}, {"node": "L27/f1", "weight": 0.5},
                    {"node": "L28/f2", "weight": 0.2}, {"node": "L27/f9", "weight": -0.1}]}
    assert decision_view_features({"decision_view": view}, 10) == ("decision_change_top_3", {27: (1,), 28: (5, 2)})
    assert decision_view_features({"decision_view": view}, 1) == ("decision_change_top_1", {28: (5,)})
    assert decision_view_features({"decision_view": {"top": view["top"][3:]}}, 10) is None
    assert decision_view_features({"dictionary": "change"}, 10) is None and decision_view_features(None, 10) is None


def test_named_change_sets_with_the_same_counts_per_hook_point_share_one_random_family():
    from irmprobe.validation.ablation import change_null_sets, held_features

    saes = {27: object(), 29: object()}
    a = FeatureSet("attribution_change_top_3", {29: (1, 2, 3)}, "change", saes=saes)
    b = FeatureSet("decision_change_top_3", {29: (4, 3, 9)}, "change", saes=saes)
    c = FeatureSet("decision_change_top_3", {27: (5,), 29: (4, 9)}, "change", saes=saes)
    assert held_features([a, c]) == {27: (5,), 29: (1, 2, 3, 4, 9)}
    live = {27: np.arange(20, 40), 29: np.arange(10, 60)}
    same = change_null_sets([a, b], live, 4, np.random.default_rng(0))
    assert [fs.name for fs in same] == [f"random_change_3 [b29:3] #{i} (control)" for i in range(1, 5)]
    spread = change_null_sets([a, c], live, 4, np.random.default_rng(0))
    assert [fs.name.split(" #")[0] for fs in spread] == ["random_change_3 [b29:3]"] * 4 + \
        ["random_change_3 [b27:1 b29:2]"] * 4
    assert all({layer: len(idx) for layer, idx in fs.features.items()} == {27: 1, 29: 2} for fs in spread[4:])


def test_two_feature_sets_are_the_same_whatever_order_they_list_their_features_in():
    from irmprobe.validation.ablation import same_features

    assert same_features({28: (2, 5), 27: (1,)}, {27: (1,), 28: (5, 2)})
    assert same_features({28: (2, 5), 29: ()}, {28: (5, 2)})  # a hook point with no feature holds none
    assert not same_features({28: (2, 5)}, {28: (2, 6)}) and not same_features({28: (2,)}, {27: (2,)})


def test_the_stopping_rule_settles_on_the_random_sets_interval_widths():
    """The ablation stops sampling once the gain is significantly positive and every random set's share has a 95%
    CI half-width within the target: noisy random sets keep it sampling, precise ones stop it, whatever share
    they estimate; a gain that is not significantly positive never settles it."""
    from irmprobe.validation.ablation import gain_share_row, shares_settled

    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(40), 4)
    base = rng.normal(0.0, 0.3, 160)
    tuned = base + 1.0 + rng.normal(0.0, 0.3, 160)
    precise = tuned - 0.02 * rng.normal(size=160)          # a random set that moves the reward little
    shifted = tuned - 0.3 - 0.02 * rng.normal(size=160)    # as precise, but removing 30% of the gain
    noisy = tuned - rng.normal(0.0, 1.5, 160)              # a random set whose share is imprecise
    width = lambda r: np.diff(gain_share_row(base, tuned, r, prompts)["ci"])[0] / 2  # noqa: E731
    assert width(precise) < 0.05 and width(shifted) < 0.05 and width(noisy) > 0.15
    settled = shares_settled(base, tuned, [precise, shifted], prompts, 0.15)
    assert settled["settled"] and settled["gain_positive"]
    assert settled["widest"] == pytest.approx(max(width(precise), width(shifted)))
    unsettled = shares_settled(base, tuned, [precise, noisy], prompts, 0.15)
    assert not unsettled["settled"] and unsettled["widest"] == pytest.approx(width(noisy))
    assert shares_settled(base, tuned, [precise, noisy], prompts, 1.0)["settled"]  # a looser target is met
    flat = shares_settled(base, base + rng.normal(0.0, 0.3, 160), [precise], prompts, 10.0)
    assert not flat["settled"] and not flat["gain_positive"] and flat["widest"] is None
    assert not shares_settled(base, tuned, [], prompts, 10.0)["settled"]  # no random sets: nothing to settle on


def test_the_ablation_samples_in_rounds_until_the_rule_settles(tiny_llama_dir, monkeypatch):
    """With a target half-width the ablation draws min_samples_per_prompt, then one more per prompt until the rule
    settles: the rule reads the random sets' rewards, paired with the base's and the tuned model's; the rows are
    those of a fixed run with that many samples, the record says how many and why, and without a target no check
    runs."""
    import irmprobe.validation.ablation as ab
    from irmprobe.analysis.verdict import sampling_text
    from irmprobe.reporting.tracking import headline_scalars
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)
    prompts = ["one two three", "four five", "six seven eight nine", "ten"]
    exact = {1: _identity_change_dictionary(pair.d_model)}
    # A random set that changes what the model writes (every change feature: the base's block-1 output) and a
    # targeted set that changes nothing: the rule must read the first, not the second.
    sets = [FeatureSet("no change feature", {1: ()}, "change", saes=exact),
            FeatureSet("random_change_64 #1 (control)", {1: tuple(range(2 * pair.d_model))}, "change", saes=exact)]
    seen = []

    def rule(base_r, tuned_r, randoms, prompt_index, half_width, seed=0):
        seen.append((base_r, tuned_r, randoms, prompt_index, half_width))
        return {"settled": len(seen) == 3, "gain_positive": True, "widest": 0.5 / len(seen)}

    monkeypatch.setattr(ab, "shares_settled", rule)
    kw = dict(max_new_tokens=6, seed=3, batch_size=8)
    rows = ab.paired_rows(base, tuned, pair.tokenizer, {}, sets, _TextRM(), prompts, (1,), "resid_post",
                          samples_per_prompt=6, share_half_width=0.15, min_samples_per_prompt=2, **kw)
    assert [len(b) for b, *_ in seen] == [8, 12, 16] and all(len(r) == 1 and w == 0.15 for *_, r, _, w in seen)
    sampling = rows[0]["sampling"]
    assert sampling["samples_per_prompt"] == 4 and sampling["stopped_by"] == "widths" and len(sampling["checks"]) == 3
    fixed = ab.paired_rows(base, tuned, pair.tokenizer, {}, sets, _TextRM(), prompts, (1,), "resid_post",
                           samples_per_prompt=4, **kw)
    assert len(seen) == 3 and fixed[0]["sampling"]["checks"] == []  # no target: no check
    for a, b in zip(rows, fixed):
        assert {k: v for k, v in a.items() if k not in ("seconds", "sampling")} == \
            {k: v for k, v in b.items() if k not in ("seconds", "sampling")}
    # What the last check read is what the rows report: the base's, the tuned model's and the random set's rewards,
    # in (prompt, sample) order.
    base_r, tuned_r, (random_r,), index, _ = seen[-1]
    by_set = {r["set"]: r["reward"]["mean"] for r in rows}
    assert (base_r.mean(), tuned_r.mean(), random_r.mean()) == pytest.approx(
        (by_set["base model (reference)"], by_set["none"], by_set["random_change_64 #1 (control)"]), abs=1e-12)
    assert index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert by_set["random_change_64 #1 (control)"] != pytest.approx(by_set["none"])  # the set does change the text
    text = sampling_text(rows)
    assert text.startswith("4 prompts x 4 samples per prompt, where sampling stopped")
    assert "widest 0.167; 2 to 6" in text
    assert sampling_text(fixed) == "4 prompts x 4 samples per prompt (fixed: validate.samples_per_prompt)"
    assert headline_scalars({"validation": {"ablation": rows}})["ablation/samples_per_prompt"] == 4
    # No random set: nothing to check, so the most samples, and the record says why.
    lone = ab.paired_rows(base, tuned, pair.tokenizer, {}, sets[:1], _TextRM(), prompts, None, "resid_post",
                          samples_per_prompt=3, share_half_width=0.15, min_samples_per_prompt=2, echo=lambda _: None,
                          **kw)
    assert len(seen) == 3 and lone[0]["sampling"]["samples_per_prompt"] == 3
    assert sampling_text(lone).endswith("3 samples per prompt (no random sets: the rule had nothing to check)")


def test_a_gain_that_is_not_significantly_positive_ends_the_sampling(tiny_llama_dir, monkeypatch):
    """Sampling on until the gain test passes would be optional stopping on it: the first check that finds the gain
    not significantly positive ends the sampling, and the record says why."""
    import irmprobe.validation.ablation as ab
    from irmprobe.analysis.verdict import sampling_text
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)
    monkeypatch.setattr(ab, "shares_settled", lambda *a, **k: {"settled": False, "gain_positive": False,
                                                                "widest": None})
    rows = ab.paired_rows(base, tuned, pair.tokenizer, {}, [FeatureSet("random_1 #1 (control)", {}, "reconstruction")],
                          _TextRM(), ["one two", "three four five"], None, samples_per_prompt=5, max_new_tokens=4,
                          seed=1, batch_size=8, share_half_width=0.15, min_samples_per_prompt=2)
    sampling = rows[0]["sampling"]
    assert sampling["samples_per_prompt"] == 2 and sampling["stopped_by"] == "gain" and len(sampling["checks"]) == 1
    assert "the reward gain was not significantly positive" in sampling_text(rows)


def test_the_ablation_table_keeps_each_random_sets_draw_number():
    from irmprobe.reporting.summary import ablation_table

    def row(name, mode="change"):
        return {"set": name, "mode": mode, "n_features": 10, "reward": {"mean": 0.5, "ci": [0.4, 0.6]},
                "gain_share": {"share": 0.1, "ci": [0.0, 0.2]}}

    long = [row(f"random_change_10 [b26:1 b27:2 b28:3 b29:4] #{i} (control)") for i in (1, 2)]
    lines = ablation_table([row("none", "-")] + long)
    assert len(lines) == 4 and all(f"#{i} (control)" in line for i, line in zip((1, 2), lines[2:]))
    assert lines[1].startswith("none" + " " * 40)  # 44 characters at least, as before
    assert ablation_table([row("random_6 #1 (control)", "zero")])[0].startswith("set" + " " * 42 + "mode")
