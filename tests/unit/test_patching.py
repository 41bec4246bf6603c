"""Activation patching on tiny Llamas with a planted reward direction, decision rows, gain shares."""

import copy

import numpy as np
import pytest
import torch

from irmprobe.activations.patching import (
    cumulative_curve,
    decision_rows,
    generate_patched,
    patching_effects,
    ranking,
    table,
)
from irmprobe.validation.ablation import reward_gain_share

WORDS = "good great love happy nice best wonderful".split()
PROMPTS = ["The train left", "I bought a", "She said that", "Later that day", "We went to the",
           "He told me", "It was a", "My friend and"]
L = 2  # the block whose MLP carries the planted change


@pytest.fixture(scope="module")
def organism(planted_llama):
    """A random 4-block base whose unembedding gives a token set one direction u, and a stream of text."""
    tok, base, u, planted = planted_llama(WORDS)
    g = torch.Generator().manual_seed(1)
    stream = [torch.randint(1, len(tok), (int(n),), generator=g).tolist()
              for n in torch.randint(6, 20, (24,), generator=g)]
    return {"tok": tok, "base": base, "u": u, "planted": planted, "stream": stream}


def _tuned(organism, blocks, strength=0.15):
    """A copy of the base whose MLPs at ``blocks`` write ``strength * u`` in total, at every position."""
    tuned = copy.deepcopy(organism["base"])
    with torch.no_grad():
        for b in blocks:
            tuned.model.layers[b].mlp.down_proj.bias += strength / len(blocks) * organism["u"]
    return tuned


def test_patching_ranks_the_planted_block_first(organism):
    base, stream = organism["base"], organism["stream"]
    tuned = _tuned(organism, [L])
    ids = torch.tensor([stream[0]])
    with torch.no_grad():
        before = tuned(ids).logits
    result = patching_effects(base, tuned, stream, range(4), batch_size=5)
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, before, atol=0, rtol=0)  # the hooks are gone
    # D and the log-ratio match a direct, unbatched computation of KL(tuned || base) at real tokens.
    kl, lr = [], []
    with torch.no_grad():
        for s in stream:
            logp_t, logp_b = (m(torch.tensor([s])).logits[0, :-1].log_softmax(-1) for m in (tuned, base))
            kl.append((logp_t.exp() * (logp_t - logp_b)).sum(-1))
            lr.append((logp_t - logp_b)[torch.arange(len(s) - 1), torch.tensor(s[1:])])
    assert result.kl == pytest.approx(float(torch.cat(kl).mean()), rel=1e-4) and result.kl > 1.0
    assert result.log_ratio == pytest.approx(float(torch.cat(lr).mean()), rel=1e-4, abs=1e-5)
    assert result.n_tokens == sum(len(s) - 1 for s in stream)
    for metric in ("kl", "log_ratio"):
        share = result.share("mlp_out", metric)
        assert ranking(result, "mlp_out", metric)[0] == L
        assert share[L] > 0.8
        assert np.abs(np.delete(share, L)).max() < 0.05
    # The residual stream after block l carries the change exactly when l >= L.
    resid = result.share("resid_post")
    np.testing.assert_allclose(resid, [0.0, 0.0, 1.0, 1.0], atol=0.02)
    lines = table(result, [3, 1, 0, 2])
    assert "block   2 +1.000" in lines[2] and lines[2].rstrip().endswith("block   3")

    with pytest.raises(ValueError, match="unknown hook kind"):
        patching_effects(base, tuned, stream, [0], hook_kinds=("attn_out",))
    with pytest.raises(ValueError, match="out of range"):
        patching_effects(base, tuned, stream, [4])
    with pytest.raises(ValueError, match="empty"):
        patching_effects(base, tuned, [[5], []], [0])
    with pytest.raises(ValueError, match="metric"):
        result.share("mlp_out", "js")


def test_a_change_spread_over_all_blocks_shows_in_the_cumulative_curve(organism):
    base, stream = organism["base"], organism["stream"]
    tuned = _tuned(organism, range(4))
    result = patching_effects(base, tuned, stream, range(4), hook_kinds=("mlp_out",))
    single = result.share("mlp_out")
    assert single.max() < 0.55 and single.min() > 0.1  # each block carries part, none most of it
    curve = cumulative_curve(base, tuned, stream, result, "mlp_out")
    assert curve.order == ranking(result, "mlp_out")
    assert curve.kl_share[0] == pytest.approx(single.max(), abs=1e-6)
    steps = np.diff(np.concatenate([[0.0], curve.kl_share]))
    assert (steps[:3] > 0.1).all() and (steps > -0.01).all()  # it rises block by block
    assert curve.kl_share[-1] == pytest.approx(1.0, abs=1e-3)
    assert curve.log_ratio_share[-1] == pytest.approx(1.0, abs=1e-3)
    lines = table(result, [0, 1, 2, 3], curve)
    assert lines[-1].startswith("  k=4") and "blocks " + ",".join(map(str, curve.order)) in lines[-1]


def _reward(samples, planted):
    """Per sample: the fraction of generated tokens that are planted tokens."""
    out = []
    for ids, n in zip(samples.token_ids, samples.prompt_lens):
        cont = ids[n:]
        out.append(np.isin(cont, planted).mean() if cont else 0.0)
    return np.array(out)


def test_patching_the_planted_block_during_generation_removes_the_reward_gain(organism):
    base, tok, planted = organism["base"], organism["tok"], organism["planted"]
    tuned = _tuned(organism, [L])
    kw = dict(n_per_prompt=4, max_new_tokens=8, seed=0, batch_size=12)
    runs = {
        "base": generate_patched(base, base, tok, PROMPTS, (), **kw),
        "tuned": generate_patched(base, tuned, tok, PROMPTS, (), **kw),
        "patched": generate_patched(base, tuned, tok, PROMPTS, (L,), "mlp_out", **kw),
        "wrong": generate_patched(base, tuned, tok, PROMPTS, (0, 1), "mlp_out", **kw),
    }
    assert runs["tuned"].token_ids == generate_patched(base, tuned, tok, PROMPTS, (), **kw).token_ids  # seeded
    for run in runs.values():
        np.testing.assert_array_equal(run.prompt_index, np.repeat(np.arange(len(PROMPTS)), 4))
        assert len(run.texts) == len(PROMPTS) * 4
    r = {k: _reward(v, planted) for k, v in runs.items()}
    assert r["tuned"].mean() - r["base"].mean() > 0.3
    share = reward_gain_share(r["base"], r["tuned"], r["patched"], runs["base"].prompt_index, n_resamples=500)
    assert share.share >= 0.8 and share.ci[0] > 0.5
    wrong = reward_gain_share(r["base"], r["tuned"], r["wrong"], runs["base"].prompt_index, n_resamples=500)
    assert abs(wrong.share) < 0.2
    # Paired sampling: patching the planted block makes the tuned model the base, so the same samples come out.
    assert np.mean([a == b for a, b in zip(runs["patched"].token_ids, runs["base"].token_ids)]) > 0.9
    with pytest.raises(ValueError, match="unknown hook kind"):
        generate_patched(base, tuned, tok, PROMPTS, (L,), "mlp", **kw)


def test_patching_finds_the_changed_block_of_a_neox_model(tiny_neox_dir):
    from transformers import GPTNeoXForCausalLM

    base = GPTNeoXForCausalLM.from_pretrained(tiny_neox_dir).eval()
    with torch.no_grad():
        base.get_output_embeddings().weight *= 30.0
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.gpt_neox.layers[0].mlp.dense_4h_to_h.bias += 0.5 * torch.randn(32)
    stream = [[5, 9, 17, 33, 2, 8, 40], [7, 7, 12, 90]]
    result = patching_effects(base, tuned, stream, [0, 1], batch_size=1)
    np.testing.assert_allclose(result.share("mlp_out"), [1.0, 0.0], atol=0.05)
    np.testing.assert_allclose(result.share("resid_post"), [1.0, 1.0], atol=0.05)


def test_decision_rows_pair_each_token_with_its_decision_position():
    # Rows of two sequences in a shuffled order; sequence 0 lacks position 3, sequence 5 starts at 1.
    seq = np.array([0, 5, 0, 0, 5, 0, 5])
    pos = np.array([1, 2, 2, 4, 1, 5, 3])
    rows_t, rows_prev = decision_rows(seq, pos)
    # (0,2)<-(0,1), (5,2)<-(5,1), (0,5)<-(0,4), (5,3)<-(5,2); (0,1), (5,1) and (0,4) have no captured t-1.
    np.testing.assert_array_equal(rows_t, [1, 2, 5, 6])
    np.testing.assert_array_equal(rows_prev, [4, 0, 3, 1])
    assert (seq[rows_t] == seq[rows_prev]).all() and (pos[rows_t] - 1 == pos[rows_prev]).all()
    # Position 0 and the last position of the previous sequence are not a decision position.
    np.testing.assert_array_equal(decision_rows([0, 1], [3, 0])[0], [])
    assert decision_rows([], [])[0].size == 0
    with pytest.raises(ValueError, match="more than one row"):
        decision_rows([0, 0], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        decision_rows([0, 0], [1])


def test_reward_gain_share_and_its_paired_ci():
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(40), 3)
    prompt_effect = rng.normal(0, 1.0, 40)[prompts]  # shared by the paired conditions
    base = prompt_effect + rng.normal(0, 0.1, 120)
    tuned = base + 1.0
    ablated = base + 0.3 + rng.normal(0, 0.1, 120)
    share = reward_gain_share(base, tuned, ablated, prompts, n_resamples=1000)
    assert share.share == pytest.approx(1.0 - (ablated - base).mean(), abs=1e-9)
    # Pairing removes the prompt-to-prompt noise, which is ten times the within-prompt noise.
    assert share.ci[0] < share.share < share.ci[1] and share.ci[1] - share.ci[0] < 0.1
    assert share.ci[0] < 0.7 < share.ci[1] and share.n_prompts == 40 and share.gain == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no gain"):
        reward_gain_share(base, base, ablated, prompts)
    with pytest.raises(ValueError, match="one length"):
        reward_gain_share(base, tuned, ablated[:-1], prompts)
    with pytest.raises(ValueError, match="2 prompts"):
        reward_gain_share(base, tuned, ablated, np.zeros(120))


def test_left_padded_generation_matches_one_prompt_at_a_time(tiny_tokenizer_dir):
    # GPT-2 has absolute positions, so position ids that ignore left padding would change its output.
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight *= 20.0  # make the output depend on absolute positions
        model.lm_head.weight *= 3000.0  # near-greedy (top token >= 0.999 at each step): random numbers do not matter
    prompts = ["The train left the station at", "I", "She said that"]
    kw = dict(n_per_prompt=1, max_new_tokens=6, seed=0)
    alone = generate_patched(model, model, tok, prompts, (), **kw, batch_size=1)
    batched = generate_patched(model, model, tok, prompts, (), **kw, batch_size=3)
    assert batched.token_ids == alone.token_ids
    patched = generate_patched(model, model, tok, prompts, (0, 1), "resid_post", **kw, batch_size=3)
    assert patched.token_ids == alone.token_ids  # patching a model with itself changes nothing


def test_conditions_sampled_in_shared_batches_equal_their_own_runs(tiny_llama_dir):
    """Several conditions in one batch (the ablation's sampler) give each condition what its own run gives."""
    from contextlib import contextmanager

    from irmprobe.activations.patching import Condition, generate_conditions
    from irmprobe.validation.ablation import mlp_module
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)  # sharp enough that conditions differ
    push = torch.randn(tuned.config.hidden_size) * 3.0

    @contextmanager
    def pushed(rows=None):
        def hook(module, inputs, output):
            out = output.clone()
            out[rows if rows is not None else slice(None)] += push
            return out
        handle = mlp_module(tuned, 0).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    prompts = ["one two three", "four five", "six seven eight nine", "ten"]
    kw = dict(n_per_prompt=3, max_new_tokens=7, seed=11)
    together = generate_conditions(base, tuned, pair.tokenizer, prompts,
                                   [Condition(None), Condition(pushed), Condition(None, (1,))], "mlp_out",
                                   batch_size=7, **kw)
    alone_clean = generate_patched(base, tuned, pair.tokenizer, prompts, (), batch_size=5, **kw)
    with pushed():
        alone_pushed = generate_patched(base, tuned, pair.tokenizer, prompts, (), batch_size=12, **kw)
    alone_bound = generate_patched(base, tuned, pair.tokenizer, prompts, (1,), batch_size=1, **kw)
    assert together[0].token_ids == alone_clean.token_ids
    assert together[1].token_ids == alone_pushed.token_ids
    assert together[2].token_ids == alone_bound.token_ids and together[2].blocks == (1,)
    assert alone_clean.token_ids != alone_pushed.token_ids  # the conditions do differ
    # A null pair (tuned is the base), the hooked condition first: its hooks (rows 0..n) must not reach the
    # base's lockstep pass, which runs on the patched rows only (n rows, so the same slice would cover it).
    null = generate_conditions(tuned, tuned, pair.tokenizer, prompts, [Condition(pushed), Condition(None, (1,))],
                               "mlp_out", batch_size=8, **kw)
    assert null[0].token_ids == alone_pushed.token_ids
    assert null[1].token_ids == generate_patched(tuned, tuned, pair.tokenizer, prompts, (1,), batch_size=3,
                                                 **kw).token_ids
    # Conditions patching different blocks share a batch: each is changed at its own blocks only, and a mix of the
    # base's and the tuned activations that returns the base's is patching.
    mixed = generate_conditions(base, tuned, pair.tokenizer, prompts,
                                [Condition(None, (0,)), Condition(None, (1,), lambda b, x_base, x_tuned: x_base),
                                 Condition(None, (0, 1), lambda b, x_base, x_tuned: x_tuned)], "mlp_out",
                                batch_size=9, **kw)
    assert mixed[0].token_ids == generate_patched(base, tuned, pair.tokenizer, prompts, (0,), batch_size=4,
                                                  **kw).token_ids
    assert mixed[1].token_ids == alone_bound.token_ids
    assert mixed[2].token_ids == alone_clean.token_ids  # keeping the tuned activation changes nothing
    assert mixed[0].token_ids != alone_bound.token_ids  # block 0 and block 1 do differ
    with pytest.raises(ValueError, match="a condition with a mix needs the blocks it mixes at"):
        generate_conditions(base, tuned, pair.tokenizer, prompts, [Condition(None, (), lambda b, x, y: x)],
                            batch_size=4, **kw)


def test_the_sampler_asks_for_the_last_positions_logits_and_samples_as_with_every_positions(tiny_llama_dir,
                                                                                            monkeypatch):
    """Each step asks the model for the last position's logits only (``logits_to_keep=1``, where its forward takes
    it); the samples equal those of a model asked for every position's logits."""
    import irmprobe.activations.patching as patching
    from irmprobe.activations.patching import Condition, generate_conditions
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)
    asked = []
    handle = tuned.register_forward_pre_hook(lambda m, args, kwargs: asked.append(kwargs.get("logits_to_keep")),
                                             with_kwargs=True)
    prompts = ["one two three", "four five", "six seven eight nine", "ten"]
    kw = dict(n_per_prompt=3, max_new_tokens=7, seed=11, batch_size=6)
    conditions = [Condition(None), Condition(None, (1,))]
    last = generate_conditions(base, tuned, pair.tokenizer, prompts, conditions, "mlp_out", **kw)
    assert asked and set(asked) == {1}
    monkeypatch.setattr(patching, "_keeps_logits", lambda model_type: False)
    asked.clear()
    every = generate_conditions(base, tuned, pair.tokenizer, prompts, conditions, "mlp_out", **kw)
    handle.remove()
    assert asked and set(asked) == {None}
    assert [c.token_ids for c in last] == [c.token_ids for c in every]


def test_samples_drawn_in_rounds_equal_one_call(tiny_llama_dir):
    """The ablation samples in rounds (samples 0-1, then 2, then 3-4 of every prompt): joined, the rounds are what
    one call for samples 0-4 draws, slot by slot and in (prompt, sample) order, for every condition."""
    from irmprobe.activations.patching import Condition, generate_conditions, join_samples
    from tests.conftest import perturbed_llama_pair

    pair, base, tuned = perturbed_llama_pair(tiny_llama_dir)
    prompts = ["one two three", "four five", "six seven eight nine"]
    conds = [Condition(None), Condition(None, (1,))]
    kw = dict(max_new_tokens=6, seed=5)
    once = generate_conditions(base, tuned, pair.tokenizer, prompts, conds, "mlp_out", n_per_prompt=5, batch_size=9,
                               **kw)
    rounds = [generate_conditions(base, tuned, pair.tokenizer, prompts, conds, "mlp_out", n_per_prompt=n,
                                  first_sample=first, batch_size=4, **kw) for first, n in ((0, 2), (2, 1), (3, 2))]
    for c in range(len(conds)):
        joined = join_samples([r[c] for r in rounds])
        assert joined.token_ids == once[c].token_ids and joined.texts == once[c].texts
        assert joined.prompt_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5
        assert np.array_equal(joined.prompt_lens, once[c].prompt_lens) and joined.blocks == once[c].blocks
    assert len(set(once[0].token_ids[:5])) > 1  # a prompt's samples differ: the rounds did not repeat one draw
    with pytest.raises(ValueError, match="first_sample"):
        generate_conditions(base, tuned, pair.tokenizer, prompts, conds, n_per_prompt=1, first_sample=-1, **kw)
    with pytest.raises(ValueError, match="different blocks"):
        join_samples([rounds[0][0], rounds[1][1]])
