"""The report's text views, word table and feature cards, on planted data whose answer is known."""

import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.activations.capture import Capture
from irmprobe.activations.samples import Samples
from irmprobe.reporting.dashboard import (
    feature_cards,
    feature_key,
    named_features,
    prompt_disagreement,
    text_views,
    written_words,
)

PROMPT_LEN, GEN_LEN = 3, 4


def _planted(n_prompts=4, seed=0):
    """Two continuations per prompt (base, tuned). The IRM's value of a row is +1 on token 7 and 0 elsewhere; the
    RM's reward of a continuation counts token 7 too, except on prompt 2, where the RM rewards the continuation
    the IRM scores low: prompt 2 is where they disagree."""
    rng = np.random.default_rng(seed)
    tokens, lens, index, source, rewards = [], [], [], [], []
    ids, seqs, pos, irm = [], [], [], []
    for p in range(n_prompts):
        prompt = [1, 2, 3]
        for s, src in enumerate(("base", "tuned")):
            gen = [7, 7, 5, 6] if src == "tuned" else [5, 6, 5, 6]
            seq = len(tokens)
            tokens.append(tuple(prompt + gen))
            lens.append(PROMPT_LEN)
            index.append(p)
            source.append(src)
            sevens = gen.count(7)
            rewards.append(float(-sevens if p == 2 else sevens))
            for t in range(1, PROMPT_LEN + GEN_LEN):
                ids.append(tokens[-1][t])
                seqs.append(seq)
                pos.append(t)
                irm.append(1.0 if tokens[-1][t] == 7 else 0.0)
    samples = Samples(tuple(f"prompt {i}" for i in range(n_prompts)), tuple(tokens), np.array(lens),
                      np.array(index), np.array(source), tuple("" for _ in tokens), np.array(rewards))
    # One extra text (capture.text_path) after the samples: scored, but no prompt's continuation.
    for t in range(1, 4):
        ids.append(7)
        seqs.append(len(tokens))
        pos.append(t)
        irm.append(1.0)
    pos_arr = np.array(pos)
    n = len(ids)
    logp_tuned = rng.normal(size=n).astype(np.float32)
    capture = Capture((0,), "hook_mlp_out", np.array(ids), np.array(seqs), pos_arr,
                      np.zeros(n, np.float32), logp_tuned, {})
    eval_rows = np.flatnonzero((pos_arr >= PROMPT_LEN) | (np.array(seqs) == len(tokens)))
    return samples, capture, np.array(irm), eval_rows


def test_text_views_carry_the_three_numbers_of_scored_rows_and_lead_with_the_disagreeing_prompt():
    samples, capture, irm, eval_rows = _planted()
    views = text_views(samples, capture, irm, eval_rows, {7: 2.5}, lambda t: f"<{t}>", max_prompts=3)
    assert views["n_prompts"] == 4 and len(views["prompts"]) == 3
    first = views["prompts"][0]
    assert first["index"] == 2 and first["prompt"] == "prompt 2"  # the RM ranks its texts against the IRM
    assert first["disagreement"] > views["prompts"][1]["disagreement"]
    tuned = next(s for s in first["sequences"] if s["source"] == "tuned")
    # Continuation rows only (prompt rows are never scored), in position order, each with its own numbers.
    assert tuned["tokens"] == ["<7>", "<7>", "<5>", "<6>"]
    assert tuned["irm"] == [1.0, 1.0, 0.0, 0.0] and tuned["irm_score"] == 2.0
    assert tuned["rm"] == [2.5, 2.5, None, None]  # None: the RM does not value the token
    rows = [r for r in eval_rows if capture.seq_index[r] == 5]  # prompt 2's tuned sequence
    assert tuned["log_ratio"] == pytest.approx(capture.log_ratio[rows], abs=1e-4)
    assert tuned["reward"] == -2.0
    with pytest.raises(ValueError, match="text_prompts must be >= 1"):
        text_views(samples, capture, irm, eval_rows, {}, str, max_prompts=0)


def test_prompt_disagreement_is_the_mean_rank_gap_of_its_continuations():
    samples, _, _, _ = _planted()
    scores = np.array([0.0, 2.0] * 4)  # the IRM: tuned above base everywhere
    gap = prompt_disagreement(samples, scores)
    # RM rewards 0/2 on prompts 0, 1, 3 (same order as the IRM) and 0/-2 on prompt 2 (reversed). Percentile
    # ranks over the 8 texts: IRM 0 -> 2/8, 2 -> 6/8; RM -2 -> 0.5/8, 0 (four ties) -> 3/8, 2 (three) -> 6.5/8.
    assert np.argmax(gap) == 2
    assert gap[2] == pytest.approx(np.mean([abs(2 / 8 - 3 / 8), abs(6 / 8 - 0.5 / 8)]))
    assert gap[0] == pytest.approx(np.mean([abs(2 / 8 - 3 / 8), abs(6 / 8 - 6.5 / 8)]))
    # A continuation without a finite reward is left out of the ranks; its prompt keeps the other one's gap.
    samples.rewards[0] = np.nan
    gap = prompt_disagreement(samples, scores)
    assert np.isfinite(gap).all() and np.argmax(gap) == 2


def test_written_words_rank_by_the_full_vocabulary_log_ratio_and_count_each_model():
    samples, _, _, _ = _planted()
    vocab_lr = np.zeros(10)
    vocab_lr[[5, 6, 7]] = [-1.0, 0.1, 2.0]
    words = written_words(samples, vocab_lr, {5: " five", 6: " six", 7: " seven"}, {7: 2.5}, n=2)
    assert [r[0] for r in words["more"]] == [" seven", " six"] and words["less"][0][0] == " five"
    seven = words["more"][0]
    assert seven[2:] == [2.0, 2.5, 8, 0]  # log-ratio, RM value, written by tuned (2 x 4 prompts), by base
    assert words["less"][0][4:] == [4, 8]
    assert written_words(samples, None, {5: "x"}, {}) is None


def test_named_features_merge_every_source_under_one_feature():
    assert feature_key("L20/tuned870") == feature_key("L20/f870") == (20, 870)
    assert feature_key("L20/error") is None and feature_key("L3/base4") is None
    names = ["L0/tuned0", "L0/tuned1", "L0/tuned2", "L1/tuned0"]
    coef = np.array([0.5, -0.2, 0.1, 0.0])
    decision = np.array([0.0, 0.3, 0.0, 0.0])
    interpretation = {"judged": [{"feature": "L0/tuned2", "column": 2, "relevant": True, "score": 0.9},
                                 {"feature": "L0/tuned0", "column": 0, "relevant": False, "score": 0.1}]}
    attribution = {"named": [], "top": [{"node": "L1/f0", "attribution": 0.4}, {"node": "L1/error",
                                                                                  "attribution": 2.0}]}
    named = named_features(names, coef, decision, 2, interpretation, attribution,
                           {"irm_not_rm": [{"feature": "L0/tuned0"}], "rm_not_irm": []},
                           [{"feature": "L0/tuned1"}], ablated=True)
    assert named[(0, 0)] == ["IRM top-2", "IRM weights, RM does not track", "ablated while sampling"]
    assert named[(0, 1)] == ["decision-side top-2", "discovery concept", "ablated while sampling"]
    assert named[(0, 2)][:2] == ["IRM top-2", "judge-flagged"]
    assert named[(1, 0)] == ["attribution top 1", "ablated while sampling"]
    assert not any(k[1] < 0 for k in named)  # the error node is no feature
    unablated = named_features(names, coef, None, 2, None, None, None, [], ablated=False)
    assert set(unablated) == {(0, 0), (0, 2)} and all(v == ["IRM top-2"] for v in unablated.values())


def test_feature_cards_show_the_planted_feature_firing_where_it_was_planted():
    samples, capture, irm, eval_rows = _planted()
    n = len(capture.token_ids)
    # Feature 1 of layer 0 fires on token 7 (stronger on the second 7) and on every prompt row; feature 0 never.
    fires = np.where(capture.token_ids == 7, 1.0 + (capture.position == 4), 0.0)
    prompt_rows = (capture.position < PROMPT_LEN) & (capture.seq_index < len(samples.token_ids))
    fires[prompt_rows] = 5.0  # prompt rows: must not reach the contexts
    fires[capture.seq_index >= len(samples.token_ids)] = 9.0  # the extra text: no held-out continuation
    X = sp.csr_matrix(np.c_[np.zeros(n), fires])
    d, vocab = 4, 10
    directions = {0: np.eye(2, d)}
    unembed = np.zeros((vocab, d))
    unembed[7, 1], unembed[3, 1] = 2.0, -2.0  # feature 1's direction promotes token 7, suppresses token 3
    rm_rows = np.where(capture.token_ids == 7, 2.5, 0.0)
    judged = {"judged": [{"feature": "L0/tuned1", "explanation": "fires on 7", "detection": 0.8, "relevant": True,
                          "score": 0.7}]}
    cards = feature_cards({(0, 1): ["IRM top-1"]}, X, ["L0/tuned0", "L0/tuned1"], np.array([0.0, 0.9]), None,
                          capture, eval_rows, rm_rows, list(samples.token_ids), str, directions, unembed,
                          np.ones(d), interpretation=judged, attribution=None, n_contexts=3)
    (card,) = cards
    assert card["id"] == "L0/tuned1" and card["irm_weight"] == 0.9 and card["irm_rank"] == 1
    assert card["max_activation"] == 2.0  # prompt rows (5.0) are silenced
    assert all(c["tokens"][-1] == "7" and c["activations"][-1] == 2.0 for c in card["contexts"])
    assert all(a == 0.0 for c in card["contexts"] for t, a in zip(c["tokens"], c["activations"]) if t in "123")
    assert card["promoted"][0][0] == "7" and card["suppressed"][0][0] == "3"
    assert card["promoted"][0][1] > 0 > card["suppressed"][0][1]
    # Correlation with the RM's row values on the scored continuation rows only (prompt rows would add 5.0 where
    # the RM is 0; the extra text is no held-out continuation).
    continuation = eval_rows[capture.seq_index[eval_rows] < len(samples.token_ids)]
    expected = np.corrcoef(fires[continuation], rm_rows[continuation])[0, 1]
    assert card["rm_corr"] == pytest.approx(expected) and expected > 0.9
    assert card["frequency"] == pytest.approx(8 / len(continuation)) and sum(card["histogram"]["counts"]) == 8
    assert card["judge"]["explanation"] == "fires on 7" and card["decision_weight"] is None
    assert feature_cards({(5, 5): ["x"]}, X, ["L0/tuned0", "L0/tuned1"], np.zeros(2), None, capture, eval_rows,
                         rm_rows, list(samples.token_ids), str, directions, unembed, None, interpretation=None,
                         attribution=None, n_contexts=3) == []
