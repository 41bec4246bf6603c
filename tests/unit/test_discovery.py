import json

import numpy as np
import pytest
import scipy.sparse as sp

from irmprobe.analysis.discovery import (
    CATEGORIES,
    _bootstrap_ci,
    _token_stats,
    agreement_with_rm,
    concepts,
    discover_tokens,
    load_preference_file,
    pairs_from_generations,
    pairwise_accuracy,
    residual_top,
    rm_variance_share,
)

V = 300
PLANTED = list(range(100, 110))          # RM 0 or absent, organism shifted up
PENALISED = [120, 121]                   # RM absent, organism shifted down
VALUED = list(range(2, 40))              # RM +-(1..3), organism follows the RM's sign
RM_MAP = {t: float((1 + t % 3) * (1 if t % 2 else -1)) for t in range(40)} | {t: 0.0 for t in PLANTED[::2]}
RM_MAP[0], RM_MAP[1] = 2.0, -2.0         # planted "against": penalised although RM > 0, and the reverse


def rows(rng, mu, counts, shift=None):
    """Shuffled rows: token t occurs counts[t] times with value mu[t] + shift[t] + N(0, 1)."""
    t = np.repeat(np.arange(len(mu)), counts)
    v = mu[t] + rng.standard_normal(len(t)) + (0.0 if shift is None else shift[t])
    p = rng.permutation(len(t))
    return t[p], v[p]


def planted_pair(seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 0.5, V)  # token-specific level both organisms share (not 0: the control matters)
    shift = np.zeros(V)
    shift[PLANTED] = 1.5
    shift[VALUED] = [1.5 * np.sign(RM_MAP[t]) for t in VALUED]
    shift[0], shift[1] = -1.5, 1.5
    shift[PENALISED] = -1.5
    org = rows(rng, mu, rng.integers(8, 40, V), shift)
    ctl = rows(rng, mu, rng.integers(8, 40, V))
    return org, ctl


@pytest.fixture(scope="module")
def planted():
    (t, v), (ct, cv) = planted_pair()
    return discover_tokens(t, v, ct, cv, RM_MAP, n_bootstrap=300, decode=lambda i: f"tok{i}")


def test_planted_unvalued_tokens_lead_rewarded_unvalued(planted):
    top = [e.token_id for e in planted.category("rewarded_unvalued")[:len(PLANTED)]]
    assert len(set(top) & set(PLANTED)) >= 0.8 * len(PLANTED)
    false = [e for e in planted.discoveries if e.token_id not in set(PLANTED) | set(VALUED) | set(PENALISED) | {0, 1}]
    assert len(false) <= 2
    assert len(false) <= 0.1 * len(planted.discoveries)
    e = next(e for e in planted.entries if e.token_id == PLANTED[0])
    assert e.rm_value == 0.0 and e.vs_control and e.token == f"tok{PLANTED[0]}" and e.effect > 0
    assert next(e for e in planted.entries if e.token_id == PLANTED[1]).rm_value is None
    assert all(e.ci_low <= e.irm_value <= e.ci_high for e in planted.entries)
    width = np.array([e.ci_high - e.ci_low for e in planted.entries]) * np.sqrt([e.count for e in planted.entries])
    assert abs(np.median(width) / (2 * 1.96) - 1) < 0.15  # sd 1 noise: 95% CI of a mean ~ 3.92 / sqrt(n)
    with pytest.raises(ValueError, match="category must be one of"):
        planted.category("rewarded")


def test_planted_against_and_valued_categories(planted):
    cat = {e.token_id: e.category for e in planted.entries}
    assert cat[0] == "penalised_against" and cat[1] == "rewarded_against"
    assert all(cat[t] == "penalised_unvalued" for t in PENALISED)
    found = [t for t in VALUED if cat[t] is not None]
    assert len(found) >= 0.7 * len(VALUED)
    assert all(cat[t] == ("rewarded_valued" if RM_MAP[t] > 0 else "penalised_valued") for t in found)
    assert set(planted.counts()) == set(CATEGORIES)


def test_entries_sorted_by_q_then_effect_and_serialise(planted):
    keys = [(e.q, -abs(e.effect)) for e in planted.entries]
    assert keys == sorted(keys)
    assert len(planted.entries) == V and planted.n_tokens_seen == V
    d = json.loads(json.dumps(planted.to_dict()))
    assert d["n_tested"] == V and d["entries"][0]["q"] < 0.05
    assert {"token_id", "irm_value", "ci_low", "ci_high", "rm_value", "count", "control_value", "p", "q"} <= set(
        d["entries"][0])
    # q is BH of p: monotone in p, never below it.
    p, q = np.array([e.p for e in planted.entries]), np.array([e.q for e in planted.entries])
    assert np.all(q >= p - 1e-15) and np.all(np.diff(q[np.argsort(p)]) >= -1e-12)


def test_null_organism_gives_no_discoveries_over_seeds():
    n_any, pvals = 0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mu = rng.normal(0, 0.5, V)
        (t, v), (ct, cv) = rows(rng, mu, rng.integers(2, 30, V)), rows(rng, mu, rng.integers(2, 30, V))
        d = discover_tokens(t, v, ct, cv, RM_MAP, n_bootstrap=0, seed=seed)
        n_any += len(d.discoveries) > 0
        pvals += [e.p for e in d.entries]
    # Under the global null BH rejects anything with probability <= alpha: 1 of 20 expected.
    assert n_any <= 1
    assert np.mean(np.array(pvals) < 0.05) <= 0.06  # per-token test at (or under) its nominal level


def test_tuned_equals_base_all_zero_gives_nothing():
    t = np.repeat(np.arange(50), 5)
    d = discover_tokens(t, np.zeros(len(t)), t, np.zeros(len(t)), {}, n_bootstrap=50)
    assert d.discoveries == () and all(e.p == 1.0 and e.ci_low == e.ci_high == 0.0 for e in d.entries)


def test_token_absent_from_control_is_tested_against_zero_and_flagged():
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 0.5, 50)
    t, v = rows(rng, mu, np.full(50, 20))
    ct, cv = rows(rng, mu, np.full(50, 20))
    t, v = np.r_[t, [900] * 20, [901] * 20], np.r_[v, 3 + rng.standard_normal(20), rng.standard_normal(20) * 0.1]
    ct, cv = np.r_[ct, 901], np.r_[cv, 5.0]  # one control occurrence: shown, but too few to test against
    d = {e.token_id: e for e in discover_tokens(t, v, ct, cv, {}, n_bootstrap=0).entries}
    assert not d[900].vs_control and d[900].control_value is None and d[900].category == "rewarded_unvalued"
    assert not d[901].vs_control and d[901].control_value == 5.0 and d[901].category is None
    assert d[0].vs_control and d[0].control_count == 20


def test_min_count_and_empty_inputs():
    t, v = np.array([1, 1, 2]), np.array([0.5, 0.7, 9.0])
    d = discover_tokens(t, v, t, v, {}, n_bootstrap=10)
    assert [e.token_id for e in d.entries] == [1] and d.n_tokens_seen == 2
    assert discover_tokens(t, v, t, v, {}, min_count=3).entries == ()
    assert discover_tokens(t, v, [], [], {}, n_bootstrap=0).entries[0].vs_control is False
    with pytest.raises(ValueError, match="min_count"):
        discover_tokens(t, v, t, v, {}, min_count=1)
    with pytest.raises(ValueError, match="shape|length"):
        discover_tokens(t, v[:2], t, v, {})


def test_bootstrap_ci_matches_t_interval_and_chunking():
    rng = np.random.default_rng(3)
    counts = np.array([400, 50, 3000])
    t = np.repeat(np.arange(3), counts)
    v = rng.standard_normal(len(t)) * np.array([1.0, 2.0, 0.5])[t] + np.array([0.0, 5.0, -1.0])[t]
    ids, n, mean, sd, vs, starts = _token_stats(t, v)
    half = 1.96 * sd / np.sqrt(n)
    for budget in (1 << 22, 500):  # one chunk, and many chunks with few resamples each
        lo, hi = _bootstrap_ci(vs, starts, n, 2000, 0.95, np.random.default_rng(0), budget=budget)
        assert np.allclose(lo, mean - half, atol=0.12 * half) and np.allclose(hi, mean + half, atol=0.12 * half)


# --------------------------------------------------------------------------- concepts

def test_concepts_pick_rm_uncorrelated_features_with_their_tokens(planted):
    rng = np.random.default_rng(0)
    tok = rng.integers(0, V, 20000)
    rm_rows = np.array([RM_MAP.get(int(t), 0.0) for t in tok])
    X = np.zeros((len(tok), 4))
    X[:, 0] = np.isin(tok, PLANTED) * rng.uniform(1, 2, len(tok))           # carries planted tokens
    X[:, 1] = np.maximum(rm_rows, 0) * rng.uniform(1, 2, len(tok))          # tracks the RM
    X[:, 2] = np.isin(tok, PENALISED) * 3.0 + (tok == PLANTED[0]) * 0.5     # penalised tokens
    X[:, 3] = rng.uniform(0, 1, len(tok)) * (rng.random(len(tok)) < 0.05)  # noise, no weight
    coef = np.array([1.0, 2.0, -1.0, 0.0])
    out = concepts(planted, sp.csr_matrix(X), coef, tok, rm_rows, ["f0", "f1", "f2", "f3"], n_tokens=5)
    assert [c.feature for c in out] == ["f0", "f2"]
    assert set(out[0].tokens) <= set(PLANTED) and len(out[0].tokens) == 5 and abs(out[0].rm_corr) < 0.1
    assert out[0].labels[0] == f"tok{out[0].tokens[0]}"
    # f2 also fires on the rewarded PLANTED[0]: not part of a penalised concept.
    assert set(out[1].tokens) == set(PENALISED) and out[1].weight < 0
    assert out[0].min_q == min(e.q for e in planted.entries if e.token_id in out[0].tokens)
    assert list(out[0].activation) == sorted(out[0].activation, reverse=True)
    assert json.dumps(out[0].to_dict())


# --------------------------------------------------------------------------- variance share

def test_rm_variance_share_monotone_linear_and_independent():
    rng = np.random.default_rng(0)
    rm = rng.standard_normal(600)
    up = rm_variance_share(np.exp(rm) + 0.05 * rng.standard_normal(600), rm)
    assert up["monotone"] > 0.95 and up["direction"] == "increasing" and up["linear"] < 0.8
    down = rm_variance_share(-rm**3, rm)
    assert down["monotone"] > 0.95 and down["direction"] == "decreasing"
    assert rm_variance_share(2 * rm + 1, rm)["linear"] > 0.99
    rm_small = rng.standard_normal(150)
    for seed in range(3):
        ind = rm_variance_share(rng.standard_normal(150), rm_small, seed=seed)
        assert ind["monotone"] < 0.03 and ind["linear"] < 0.03 and ind["residual_share"] > 0.97
    # Lexicon-like RM: most rows 0, few levels; folds by sequence.
    rm_lex = rng.choice([0, 0, 0, 0, -2, -1, 1, 2], 800).astype(float)
    s = rm_variance_share(np.tanh(rm_lex) + 0.01 * rng.standard_normal(800), rm_lex, groups=np.arange(800) // 8)
    assert s["monotone"] > 0.95 and s["n"] == 800
    assert rm_variance_share(np.ones(10), rm[:10])["monotone"] is None


def test_residual_top_finds_tokens_the_rm_does_not_explain():
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 100, 5000)
    rm = np.where(tok < 30, tok % 5 - 2.0, 0.0)
    irm = rm + 0.1 * rng.standard_normal(5000) + 2.0 * (tok == 77) - 2.0 * (tok == 12)
    out = residual_top(tok, irm, rm, n=3, decode=str)
    assert out["irm_over_rm"][0]["token_id"] == 77 and out["irm_over_rm"][0]["token"] == "77"
    assert out["rm_over_irm"][0]["token_id"] == 12 and out["rm_over_irm"][0]["residual"] < -1.5
    assert len(out["irm_over_rm"]) == 3


# --------------------------------------------------------------------------- preference pairs

def test_pairwise_accuracy_planted_random_and_ties():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(200)
    good = pairwise_accuracy(r + 1.0 + rng.random(200), r)
    assert good["accuracy"] == 1.0 and good["n"] == 200 and good["ci"][0] > 0.97 and good["ci_method"] == "wilson"
    for seed in range(5):
        rng = np.random.default_rng(seed)
        for kw in ({}, {"n_bootstrap": 2000, "seed": seed}):
            res = pairwise_accuracy(rng.standard_normal(300), rng.standard_normal(300), **kw)
            assert abs(res["accuracy"] - 0.5) < 0.1 and res["ci"][0] <= 0.5 <= res["ci"][1]
    ties = pairwise_accuracy([1, 1, 2, 0], [1, 0, 3, 0])
    assert ties["accuracy"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4) and ties["n_ties"] == 2
    zero = pairwise_accuracy(np.zeros(50), np.zeros(50))  # null scorer (tuned = base): exactly 50%
    assert zero["accuracy"] == 0.5 and zero["ci"][0] < 0.5 < zero["ci"][1]
    assert pairwise_accuracy([], [])["accuracy"] is None
    with pytest.raises(ValueError, match="length"):
        pairwise_accuracy([1, 2], [1])


def test_agreement_with_rm_hand_computed():
    # Pair 0 agrees, 1 disagrees, 2 scorer tie (half), 3 RM tie (left out).
    res = agreement_with_rm([2, 0, 1, 5], [1, 1, 1, 0], [3, 3, 0, 1], [0, 0, 1, 1])
    assert res["agreement"] == pytest.approx(1.5 / 3) and res["n"] == 3 and res["n_rm_ties"] == 1
    assert agreement_with_rm([1], [0], [1], [1])["agreement"] is None


def test_pairs_from_generations_best_vs_worst_skipping_ties():
    prompts = ["p0", "p1", "p2", "p3"]
    texts = ["a", "b", "c", "d", "e", "f", "g"]
    rewards = [0.1, 0.9, 0.5, 1.0, 1.0, 0.3, -2.0]
    index = [0, 0, 0, 1, 1, 2, 3]  # p1 ties, p2 and p3 have one continuation each
    pairs = pairs_from_generations(prompts, texts, rewards, np.array(index))
    assert (pairs.prompts, pairs.chosen, pairs.rejected) == (("p0",), ("b",), ("a",))
    assert pairs.chosen_index == (1,) and pairs.rejected_index == (0,) and len(pairs) == 1
    assert pairs.to_dict()["source"] == "generations"


def test_load_preference_file_jsonl_and_csv(tmp_path):
    j = tmp_path / "pairs.jsonl"
    j.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad", "subset": "x"}\n\n'
                 '{"prompt": "q", "chosen": "c2", "rejected": "r2"}\n')
    pj = load_preference_file(j)
    assert pj.prompts == ("p", "q") and pj.chosen == ("good", "c2") and pj.rejected == ("bad", "r2")
    c = tmp_path / "pairs.csv"
    c.write_text('id,prompt,chosen,rejected\n1,"hi, there","line one\nline two",no\n2,p,c,r\n')
    pc = load_preference_file(c)
    assert pc.prompts == ("hi, there", "p") and pc.chosen[0] == "line one\nline two" and pc.source == str(c)


GOOD = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'


@pytest.mark.parametrize("name, text, match", [
    ("a.jsonl", GOOD + '{"prompt": "p", "chosen": \n', r"a\.jsonl:2: not valid JSON"),
    ("b.jsonl", GOOD + '\n{"prompt": "p", "chosen": "c"}\n', r"b\.jsonl:3: missing column\(s\) rejected"),
    ("c.jsonl", '{"prompt": "p", "chosen": ["m"], "rejected": "r"}\n', r"c\.jsonl:1: column\(s\) chosen must be text"),
    ("d.jsonl", '["p", "c", "r"]\n', r"d\.jsonl:1: expected an object"),
    ("e.csv", "prompt,chosen,answer\np,c,r\n", r"e\.csv:1: header lacks column\(s\) rejected"),
    ("f.csv", "prompt,chosen,rejected\np,c,r\np,c\n", r"f\.csv:3: missing column\(s\) rejected"),
    ("g.csv", "prompt,chosen,rejected\np,c,r,extra\n", r"g\.csv:2: more fields"),
    ("h.csv", "", r"h\.csv:1: header lacks"),
    ("i.jsonl", "\n", r"i\.jsonl: no preference pairs"),
    ("j.txt", "x", r"j\.txt: preference pairs must be \.jsonl or \.csv"),
])
def test_load_preference_file_errors_name_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_preference_file(tmp_path / name)


def _organisms(seed, k=4, v=10000, planted=30, drift=0.3, louder=1.0):
    """k + 1 organisms' full-vocabulary log-ratios: token spread growing as base log-probability falls, a
    shared low-rank drift per organism (organisms' changes correlate across tokens), ``planted`` tokens raised
    in the first organism only."""
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-20, -2, v)
    sd = 0.02 * np.exp(-logp / 8)
    x = rng.standard_normal((k + 1, v)) * sd + rng.standard_normal((k + 1, 3)) @ rng.standard_normal((3, v)) * drift * sd
    x += rng.normal(0, 0.05, (k + 1, 1))  # each organism's change of normaliser: the same for every token
    x[0] *= louder  # an organism that moved more than its controls, everywhere alike
    x[0, :planted] += 6 * sd[:planted]
    return x, logp


def test_vocabulary_discovery_controls_the_fdr_over_20_seeds_and_ignores_one_controls_outlier():
    from irmprobe.analysis.discovery import discover_vocabulary

    fdp, recall, null_counts, louder = [], [], [], []
    for seed in range(20):
        x, logp = _organisms(seed)
        found = {e.token_id for e in discover_vocabulary(x[0], x[1:], {}, strata=logp).discoveries}
        fdp.append(len({t for t in found if t >= 30}) / max(1, len(found)))
        recall.append(len(found & set(range(30))) / 30)
        x, logp = _organisms(seed, planted=0)
        null_counts.append(len(discover_vocabulary(x[0], x[1:], {}, strata=logp).discoveries))
        x, logp = _organisms(seed, planted=0, louder=2.0)
        louder.append(len(discover_vocabulary(x[0], x[1:], {}, strata=logp).discoveries))
    assert np.mean(fdp) <= 0.05, np.mean(fdp)  # measured 0.037
    assert np.mean(recall) >= 0.6, np.mean(recall)  # measured 0.68 (0.43 without removing each one's median)
    assert np.mean(null_counts) <= 1 and np.mean(louder) <= 1, (null_counts, louder)
    # A token raised only in one control is not reported (the organism "lowered" it only against that control).
    x, logp = _organisms(3, planted=0)
    x[2, 7] += 100 * 0.02 * np.exp(-logp[7] / 8)
    found = discover_vocabulary(x[0], x[1:], {}, strata=logp)
    assert 7 not in {e.token_id for e in found.discoveries}
    assert found.test == "vocabulary_vs_controls" and found.entries[0].control_count == 4


def test_vocabulary_discovery_keeps_rm_valued_tokens_in_their_own_fdr_family():
    from scipy import stats

    from irmprobe.analysis.discovery import discover_vocabulary

    x, logp = _organisms(5)
    valued = {t: 1.0 for t in range(5000, 10000)}  # half the vocabulary valued by the RM
    mixed = discover_vocabulary(x[0], x[1:], valued, strata=logp)
    for family in (lambda t: t < 5000, lambda t: t >= 5000):
        entries = [e for e in mixed.entries if family(e.token_id)]
        expected = stats.false_discovery_control([e.p for e in entries], method="bh")
        assert np.allclose([e.q for e in entries], expected)  # BH within the family, not over both
    assert {e.category for e in mixed.discoveries} <= {"rewarded_unvalued", "penalised_unvalued",
                                                       "rewarded_valued", "penalised_valued",
                                                       "rewarded_against", "penalised_against"}
    ranked = [abs(e.effect) for e in mixed.discoveries]
    assert ranked == sorted(ranked, reverse=True)  # named by effect
    with pytest.raises(ValueError, match="at least 2 control organisms"):
        discover_vocabulary(x[0], x[1:2], {})


def test_named_words_are_a_family_of_their_own_and_pass_where_the_open_search_cannot():
    from scipy import stats

    from irmprobe.analysis.discovery import discover_vocabulary, named_family

    x, logp = _organisms(2, planted=30)
    x[0, :30] -= 2.5 * 0.02 * np.exp(-logp[:30] / 8)  # raised by 3.5 sd: too little for a family of 10,000 tokens
    x[0, 30:33] -= 6 * 0.02 * np.exp(-logp[30:33] / 8)  # three lowered
    found = discover_vocabulary(x[0], x[1:], {}, strata=logp)
    named = list(range(33)) + [40, 41, 40]  # two unplanted tokens, one repeated
    fam = named_family(found, named)
    assert fam["n"] == 35 and fam["untested"] == [] and [e["token_id"] for e in fam["entries"]] == named[:35]
    by = {e.token_id: e for e in found.entries}
    expected = stats.false_discovery_control([by[t].p for t in named[:35]], method="bh")
    assert np.allclose([e["q"] for e in fam["entries"]], expected)
    open_hits = {e.token_id for e in found.discoveries} & set(range(30))
    rewarded = {e["token_id"] for e in fam["entries"] if e["direction"] == "rewarded"}
    assert len(rewarded & set(range(30))) >= 20 > len(open_hits), (len(rewarded), len(open_hits))
    assert {e["token_id"] for e in fam["entries"] if e["direction"] == "penalised"} == {30, 31, 32}
    assert fam["passed"] == len(rewarded) + 3 and not rewarded & {40, 41}
    # Tokens discovery did not test are listed apart; the null keeps its level.
    part = discover_vocabulary(x[0], x[1:], {}, tokens=np.arange(100, 10000), strata=logp)
    assert named_family(part, [5, 150])["untested"] == [5] and named_family(part, [5, 150])["n"] == 1
    nulls = []
    for seed in range(20):
        x, logp = _organisms(seed, planted=0)
        nulls.append(named_family(discover_vocabulary(x[0], x[1:], {}, strata=logp), range(30))["passed"] > 0)
    assert np.mean(nulls) <= 0.15, nulls
    with pytest.raises(ValueError, match="alpha"):
        named_family(found, named, alpha=1.0)


def test_load_word_list_reads_first_fields_once_and_refuses_an_empty_or_missing_file(tmp_path):
    from irmprobe.analysis.discovery import load_word_list

    path = tmp_path / "words.tsv"
    path.write_text("# suspected\nnight\t2.0\n\nday\nnight\n  morning \n")
    assert load_word_list(path) == ["night", "day", "morning"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no word"):
        load_word_list(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_word_list(tmp_path / "missing.txt")


class _VocabCapture:
    """What the discover stage reads of a control's capture: the full-vocabulary sums."""

    def __init__(self, change, logp):
        self.token_ids = np.zeros(10)
        self.vocab_logp_sum = {"base": logp * 10, "tuned": (logp + change) * 10}

    def vocab_log_ratio(self):
        return (self.vocab_logp_sum["tuned"] - self.vocab_logp_sum["base"]) / len(self.token_ids)


def _listed(seed, k, kind="shift", size=4.0, planted=0):
    """``_organisms`` with the first 30 tokens (a list) behaving as words chosen together might, in every organism:
    ``shift``, a shift of their own per organism (``size`` sd: words that move together whatever the reward);
    ``spread``, spreads that differ by word; ``noisy``, five of them five times as noisy; ``drift``, moving
    together along three directions; ``heavy``, heavy-tailed moves of single words. With ``planted``, the first
    ``planted`` raised by 3.5 sd in the organism."""
    x, logp = _organisms(seed, planted=0, k=k)
    sd = 0.02 * np.exp(-logp[:30] / 8)
    rng = np.random.default_rng(100 + seed)
    if kind == "shift":
        x[:, :30] += rng.normal(0, size, (k + 1, 1)) * sd
    elif kind == "spread":
        x[:, :30] += rng.standard_normal((k + 1, 30)) * sd * np.exp(rng.normal(0, 0.5, 30))
    elif kind == "noisy":
        x[:, :5] += rng.standard_normal((k + 1, 5)) * sd[:5] * 5
    elif kind == "drift":
        x[:, :30] += rng.standard_normal((k + 1, 3)) @ rng.standard_normal((3, 30)) * sd
    elif kind == "heavy":  # now and then an organism moves a word far (Student t with 2 d.f.)
        x[:, :30] += rng.standard_t(2, (k + 1, 30)) * sd * 2
    x[0, :planted] += 3.5 * sd[:planted]
    return x, logp


def test_a_named_list_is_judged_word_by_word_against_the_controls_values_of_each_word():
    """Words that move together in every organism pass the stratum-calibrated family on nulls far above alpha. Each
    word judged against the controls' values of that word keeps its level whatever the words do (move together,
    differ in spread, drift along several directions); the list as one set carries the power."""
    from irmprobe.analysis.discovery import discover_vocabulary, named_family, named_vocabulary

    stratum = []
    for seed in range(20):
        x, logp = _listed(seed, 4)
        stratum.append(named_family(discover_vocabulary(x[0], x[1:], {}, strata=logp), range(30))["passed"] > 0)
    assert np.mean(stratum) >= 0.5, stratum  # the stratum's null: measured 0.80 of null lists pass
    for kind, size in (("shift", 0.0), ("shift", 4.0), ("spread", 0), ("noisy", 0), ("drift", 0), ("heavy", 0)):
        words, lists, sets, shares, ungated = [], [], [], [], []
        for seed in range(30):
            x, logp = _listed(seed, 5, kind, size)
            n = named_vocabulary(x[0], x[1:], range(30), {}, strata=logp)
            words += [e["p"] < 0.05 for e in n["entries"]]
            lists.append(n["passed"] > 0)
            sets.append(n["set"]["passed"])
            ungated.append(any(e["q"] < 0.05 for e in n["entries"]))
            shares.append(n["shared_share"])
            assert n["df"] == 4 and n["set"]["df"] == 4 and n["n"] == 30
            assert n["passed"] == 0 or n["set"]["passed"]  # words are named only within a list that passes
        assert np.mean(lists) <= np.mean(sets) <= 0.15, (kind, size)
        if kind != "heavy":  # normal draws: a word alone keeps its level too
            assert np.mean(words) <= 0.1 and np.mean(ungated) <= 0.15, (kind, size)
        else:  # heavy tails: a word alone does not, which is why the set gates it
            assert np.mean(ungated) >= 0.2 and np.mean(lists) <= 0.15, (np.mean(ungated), np.mean(lists))
        if kind == "shift":  # the shared part seen: measured 0.93 and 0.00
            assert (np.median(shares) > 0.8) if size else (np.median(shares) < 0.1), (size, np.median(shares))
    # A planted list, raised by 3.5 sd: too little for the open search over 10,000 tokens.
    x, logp = _listed(2, 6, "shift", 0.0, planted=30)
    found = discover_vocabulary(x[0], x[1:], {}, strata=logp)
    n = named_vocabulary(x[0], x[1:], list(range(30)) + [40, 41, 40], {41: 1.0}, strata=logp, decode=str)
    rewarded = {e["token_id"] for e in n["entries"] if e["direction"] == "rewarded"}
    open_hits = {e.token_id for e in found.discoveries} & set(range(30))
    assert len(rewarded) >= 8 > len(open_hits) and rewarded <= set(range(30)), (len(rewarded), len(open_hits))
    assert n["passed"] == len(rewarded) and n["n"] == 32 and [e["token_id"] for e in n["entries"]][-2:] == [40, 41]
    assert n["set"]["t"] > 5 and n["set"]["df"] == 5 and n["set"]["p"] < 0.01
    assert all(e["category"] == "rewarded_unvalued" and e["token"] == str(e["token_id"]) and e["effect"] > 0
               for e in n["entries"] if e["direction"])
    assert n["entries"][-1]["rm_value"] == 1.0
    # By hand, one stratum: each organism centred by its median and divided by its normal-consistent MAD; a word's
    # prediction t against the three controls on 2 d.f., its p-value calibrated by the controls' own (each against
    # the other two, 1 d.f., over every token); the set's t on the words' means.
    from scipy import stats

    v = np.random.default_rng(9).normal(size=(4, 500))
    z = [(r - np.median(r)) / stats.median_abs_deviation(r, scale="normal") for r in v]
    hand = [(z[0][w] - np.mean([c[w] for c in z[1:]])) / (np.std([c[w] for c in z[1:]], ddof=1) * np.sqrt(4 / 3))
            for w in (0, 1)]
    m = [np.mean([r[0], r[1]]) for r in z]
    by = named_vocabulary(v[0], v[1:], [0, 1], {})
    assert [e["t"] for e in by["entries"]] == pytest.approx(hand, rel=1e-9)
    null = np.sort(np.concatenate([
        2 * stats.t.sf(np.abs((z[j] - np.mean([z[i] for i in (1, 2, 3) if i != j], axis=0))
                              / (np.std([z[i] for i in (1, 2, 3) if i != j], axis=0, ddof=1) * np.sqrt(3 / 2))), 1)
        for j in (1, 2, 3)]))
    nominal = [2 * stats.t.sf(abs(h), 2) for h in hand]
    assert [e["p"] for e in by["entries"]] == pytest.approx([(1 + np.sum(null <= p)) / 1501 for p in nominal])
    assert by["word_null"] == len(null) == 1500
    assert by["set"]["t"] == pytest.approx((m[0] - np.mean(m[1:])) / (np.std(m[1:], ddof=1) * np.sqrt(4 / 3)))
    # The same list, co-moving: the organism's raise is told from the words' shared part only as a set.
    x, logp = _listed(2, 6, "shift", 1.0, planted=30)
    assert named_vocabulary(x[0], x[1:], range(30), {}, strata=logp)["set"]["p"] < 0.05
    # Untested tokens apart (outside the tested tokens, or controls that do not vary); bad input refused.
    x[1, 7] = np.nan
    part = named_vocabulary(x[0], x[1:], [5, 150, 7], {}, tokens=np.r_[7, np.arange(100, 10000)], strata=logp)
    assert part["untested"] == [5, 7] and part["n"] == 1 and np.isfinite(part["entries"][0]["p"])
    assert part["shared_share"] is None and part["set"]["t"] == pytest.approx(part["entries"][0]["t"])
    same = named_vocabulary(x[0], np.tile(x[2], (3, 1)), [0, 1], {})  # controls that do not vary test nothing
    assert same["n"] == 0 and same["untested"] == [0, 1] and same["set"] is None
    with pytest.raises(ValueError, match="at least 2 control organisms"):
        named_vocabulary(x[0], x[1:2], range(30), {})
    with pytest.raises(ValueError, match="alpha"):
        named_vocabulary(x[0], x[1:], range(30), {}, alpha=1.0)
    with pytest.raises(ValueError, match=r"must be \[K, 10000\]"):
        named_vocabulary(x[0], x[1:, :50], range(30), {})


def test_a_named_words_p_value_is_calibrated_by_the_controls_own_when_single_words_move_far():
    """Heavy-tailed moves of single tokens everywhere (Student t, 2 d.f.) and 10 of 30 listed words truly raised: the
    nominal per-word t names false words once the list passes; calibrated by the controls' own per-word p-values over
    the vocabulary, it keeps the false-discovery rate near alpha."""
    import irmprobe.analysis.discovery as discovery

    def organisms(seed):
        x, logp = _organisms(seed, planted=0, k=6)
        sd = 0.02 * np.exp(-logp / 8)
        x += np.random.default_rng(500 + seed).standard_t(2, x.shape) * sd * 2
        x[0, :10] += 8 * sd[:10]
        return x, logp

    false = {}
    for label, null in (("calibrated", discovery._word_null), ("nominal", lambda z: None)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(discovery, "_word_null", null)
            runs = []
            for seed in range(40):
                x, logp = organisms(seed)
                n = discovery.named_vocabulary(x[0], x[1:], range(30), {}, strata=logp)
                runs.append(any(e["direction"] and e["token_id"] >= 10 for e in n["entries"]))
            false[label] = np.mean(runs)
    # measured over 100: lists naming a false word 0.05 calibrated, 0.17 nominal (FDR 0.047 and 0.089)
    assert false["calibrated"] <= 0.1 < false["nominal"], false


def test_the_named_lists_control_check_and_its_line():
    """Each control named against the others: its passes are rare whether the words move together or not; the
    verdict line says what passed, the set's t, how much the words move together and the control check."""
    from irmprobe.analysis.discovery import named_vocabulary
    from irmprobe.analysis.verdict import named_words_line
    from irmprobe.pipeline.stages.discover import control_passes

    for size in (0.0, 4.0):
        flagged = []
        for seed in range(6):
            x, logp = _listed(seed, 5, "shift", size)
            named = named_vocabulary(x[0], x[1:], range(30), {}, strata=logp)
            controls = [{"capture": _VocabCapture(x[j], logp)} for j in range(1, 6)]
            checks = control_passes(named, controls, {}, np.arange(len(logp)), 0.05)
            assert len(checks) == 5
            flagged.append(np.mean([c > 0 for c in checks]))
        assert np.mean(flagged) <= 0.15, (size, flagged)
    assert control_passes(named, controls[:2], {}, np.arange(3), 0.05) is None  # a control needs 2 others
    x, logp = _listed(2, 6, "shift", 0.0, planted=30)
    named = named_vocabulary(x[0], x[1:], range(30), {}, strata=logp, decode=str)
    for e in named["entries"]:
        e["word"] = f"w{e['token_id']}"
    line = named_words_line(named | {"path": "dir/w.txt", "words": 31, "not_one_token": ["two words"],
                                     "same_token": [], "control_passes": [0, 1, 0, 0, 0, 0]})
    assert line.startswith("named words (w.txt; its 30 words against the controls' values of the same words, t on "
                           "5 d.f.: the list as one set, then each word within a list that passes")
    first = next(e for e in named["entries"] if e["direction"])
    assert (f"as one set, mean z {named['set']['effect']:+.2f}, t {named['set']['t']:+.2f}, p "
            f"{named['set']['p']:.2g}: it passes; {named['passed']} word(s) pass q < 0.05: 'w{first['token_id']}' "
            f"rewarded {first['effect']:+.2f} nats") in line
    assert "(1 not one token after a space)" in line and "0, 1, 0, 0, 0, 0 word(s) pass" in line
    x, logp = _listed(0, 6, "shift", 0.0)  # a null list: its set does not pass, so no word is named
    null = named_vocabulary(x[0], x[1:], range(30), {}, strata=logp, decode=str)
    assert not null["set"]["passed"] and null["passed"] == 0
    closed = named_words_line(null | {"path": "w.txt", "words": 30, "not_one_token": [], "same_token": []})
    assert f"p {null['set']['p']:.2g}: not told apart from the controls at 0.05, so no word is named" in closed
    assert f"the controls' listed words share {named['shared_share']:.0%} of their spread" in line
    assert "not tested: " in named_words_line({"path": "w.txt", "note": "needs 2 controls"})
    # A record of an earlier version (no gate: no "passed" in its set, or no set) keeps its passes as they were.
    for old in ({k: v for k, v in named.items() if k not in ("test", "set", "shared_share")},
                named | {"set": {k: v for k, v in named["set"].items() if k != "passed"}}):
        line = named_words_line(old | {"path": "w.txt", "words": 30, "not_one_token": [], "same_token": []})
        assert line.startswith("named words (w.txt; Benjamini-Hochberg over its 30 words only") and \
            f"{named['passed']} pass q < 0.05: 'w{first['token_id']}'" in line
