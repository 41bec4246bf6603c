import numpy as np
import pytest

from irmprobe.analysis.agreement import agreement, kendall_tau, paired


def test_kendall_tau_pairs_values_by_token_hand_computed():
    irm = {1: 0.1, 2: 0.4, 3: 0.2, 4: 0.9, 7: 5.0}
    rm = {4: 2.0, 2: 1.0, 1: -1.0, 3: 1.5, 5: 9.0}
    ids, a, b = paired(irm, rm)
    assert ids.tolist() == [1, 2, 3, 4]
    # Pairs (i<j): (1,2) C, (1,3) C, (1,4) C, (2,3) D, (2,4) C, (3,4) C -> tau = (5-1)/6.
    tau, p = kendall_tau(a, b)
    assert tau == pytest.approx(4 / 6)
    assert 0 < p < 1
    # Sorting each list by value independently (the research code's defect) would give tau = 1.
    assert kendall_tau(np.sort(a), np.sort(b))[0] == pytest.approx(1.0)


def test_sign_accuracy_against_neutral_point():
    # Neutral point = median of all IRM values = 0.0 (tokens 10, 11, 12 are neutral).
    irm = {1: 1.0, 2: -0.5, 3: -2.0, 4: 0.5, 10: 0.0, 11: 0.0, 12: 0.0}
    rm = {1: 2.0, 2: 1.0, 3: -1.0, 4: -3.0}
    row = agreement("view", irm, rm)
    assert row.neutral_point == 0.0
    assert row.sign_acc_pos == pytest.approx(0.5)   # token 1 right, token 2 wrong
    assert row.sign_acc_neg == pytest.approx(0.5)   # token 3 right, token 4 wrong
    assert (row.n_pos, row.n_neg, row.n_tokens) == (2, 2, 4)


def test_identically_zero_irm_reports_no_tau():
    row = agreement("null", {1: 0.0, 2: 0.0, 3: 0.0}, {1: 1.0, 2: -1.0, 3: 2.0})
    assert row.is_zero and row.tau is None and row.p_value is None


def test_too_few_tokens_give_a_note_not_a_figure():
    row = agreement("v", {1: 0.3, 2: 0.1}, {1: 1.0})
    assert row.tau is None and "only 1 RM token(s)" in row.note
    with pytest.raises(ValueError, match="paired by token"):
        kendall_tau(np.ones(3), np.ones(2))


def test_bootstrap_ci_brackets_tau_and_is_seeded():
    from irmprobe.analysis.agreement import tau_confidence_interval

    rng = np.random.default_rng(0)
    rm = rng.standard_normal(300)
    irm = rm + rng.standard_normal(300)
    tau, _ = kendall_tau(irm, rm)
    lo, hi = tau_confidence_interval(irm, rm, n_resamples=300, seed=1)
    assert lo < tau < hi and 0.05 < hi - lo < 0.2
    assert (lo, hi) == tau_confidence_interval(irm, rm, n_resamples=300, seed=1)


def test_error_vs_frequency_hand_computed():
    from irmprobe.analysis.agreement import error_vs_frequency

    # Ranks agree on the two frequent tokens, and are swapped on the two rare ones.
    irm = np.array([1.0, 2.0, 4.0, 3.0])
    rm = np.array([1.0, 2.0, 3.0, 4.0])
    out = error_vs_frequency(irm, rm, np.array([100, 90, 1, 2]))
    # Percentile ranks (r - 0.5) / 4: errors 0, 0, 0.25, 0.25 -> errors fall as counts rise.
    assert out["rho"] == pytest.approx(-np.sqrt(0.8))  # Spearman of (0,0,1,1)-ranked errors vs counts
    assert out["quartile_error"] == [0.25, 0.25, 0.0, 0.0]


def test_disagreements_each_way():
    from irmprobe.analysis.agreement import disagreements

    irm = {1: 5.0, 2: 0.0, 3: 1.0, 4: -1.0}
    rm = {1: -2.0, 2: 3.0, 3: 1.0, 4: -1.0}
    d = disagreements(irm, rm, decode=lambda t: f"t{t}", n=1)
    assert [row[0] for row in d["irm_over_rm"]] == ["t1"]  # IRM's top, RM's bottom
    assert [row[0] for row in d["rm_over_irm"]] == ["t2"]


def test_text_agreement_and_compare_view():
    from irmprobe.analysis.agreement import compare_view, error_vs_frequency, text_agreement

    out = text_agreement(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.1, 0.3, 0.2, 0.9]))
    assert out["text_tau"] == pytest.approx(4 / 6) and out["n_texts"] == 4
    irm = {i: float(i) for i in range(1, 30)}
    rm = {i: float(i) * (-1) ** (i % 7 == 0) for i in range(1, 30)}
    row = compare_view("v", "behavioural", irm, {i: i for i in irm}, rm, n_bootstrap=100)
    assert row["family"] == "behavioural" and row["tau_ci"][0] <= row["tau"] <= row["tau_ci"][1]
    # Tokens 7, 14, 21, 28 are flipped, so the RM ranks them 4, 3, 2, 1 and token i (not a multiple
    # of 7) at 4 + i - i // 7. Squared rank gaps: 6 * (16 + 9 + 4 + 1) + 0 over the others, and
    # 3^2 + 11^2 + 19^2 + 27^2 over the flipped: 1400 -> rho = 1 - 6 * 1400 / (29 * 840) = 19 / 29.
    assert row["spearman"] == pytest.approx(19 / 29)
    # Discordant pairs: each flipped token m against every token before it, 6 + 13 + 20 + 27 = 66 of 406.
    assert row["tau"] == pytest.approx((406 - 2 * 66) / 406)
    ids = np.arange(1, 30)
    expected = error_vs_frequency(ids.astype(float), np.array([rm[i] for i in ids]), ids)  # count of token i is i
    assert row["error_vs_frequency"]["rho"] == pytest.approx(expected["rho"]) and expected["rho"] < -0.5
    zero = compare_view("z", "behavioural", irm, {}, rm, is_zero=True)
    assert zero["is_zero"] and zero["tau"] is None


def test_feature_alignment_finds_planted_hacking_feature():
    import scipy.sparse as sp

    from irmprobe.analysis.agreement import feature_alignment

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, 2000)
    rm_value = np.array([2.0, -2.0, 0.0, 0.0, 0.0, 0.0])[tokens]
    X = np.zeros((2000, 3))
    X[:, 0] = (tokens == 0) * rng.uniform(1, 2, 2000)  # tracks an RM-positive token
    X[:, 1] = (tokens == 4) * rng.uniform(1, 2, 2000)  # fires on a token the RM does not value
    X[:, 2] = (tokens == 1) * rng.uniform(1, 2, 2000)  # tracks an RM-negative token
    coef = np.array([0.0, 1.0, -0.5])  # the IRM rewards feature 1, ignores feature 0
    out = feature_alignment(sp.csr_matrix(X), coef, rm_value, tokens, decode=lambda t: f"t{t}",
                            feature_names=["f0", "f1", "f2"], n=3)
    assert [e["feature"] for e in out["irm_not_rm"]] == ["f1"]
    assert out["irm_not_rm"][0]["top_tokens"][0] == "t4"
    assert [e["feature"] for e in out["rm_not_irm"]] == ["f0"]
    assert out["rm_corr"][0] > 0.5 and out["rm_corr"][2] < -0.5


def test_against_control_margins_and_flags():
    from irmprobe.analysis.agreement import against_control

    rows = [{"name": "a", "family": "behavioural", "tau": 0.3, "tau_ci": [0.25, 0.35]},
            {"name": "b", "family": "rm_informed", "tau": 0.5, "tau_ci": [0.45, 0.55]}]
    ctrl = [{"name": "a", "tau": 0.05, "tau_ci": [0.0, 0.1], "is_zero": False},
            {"name": "b", "tau": 0.5, "tau_ci": [0.44, 0.56], "is_zero": False}]
    out = {r["name"]: r for r in against_control(rows, ctrl)}
    assert out["a"]["above_control"] == pytest.approx(0.25) and out["a"]["above_control_ci"]
    assert out["b"]["above_control"] == pytest.approx(0.0) and not out["b"]["above_control_ci"]
    assert "cannot tell a control" in out["b"]["control_flag"] and "control_flag" not in out["a"]


def test_error_vs_frequency_quartiles_with_tied_counts():
    from irmprobe.analysis.agreement import error_vs_frequency

    counts = np.array([1, 1, 1, 1, 1, 1, 2, 2, 5, 9, 12, 30])
    rm = np.arange(12, dtype=float)
    irm = rm.copy()
    irm[:6] = irm[:6][::-1]  # the six rarest tokens are mis-ranked, the frequent ones right
    out = error_vs_frequency(irm, rm, counts)
    # Quartiles by count rank, ties in order: tokens 0-2, 3-5, 6-8, 9-11. The reversed six are off by
    # 5, 3, 1, 1, 3, 5 ranks of 12: mean 9/36 in each of the two rarest quartiles, 0 in the others.
    assert out["quartile_error"] == pytest.approx([0.25, 0.25, 0.0, 0.0])


def _clustered(rng, tokens, rm, n_prompts, p_token=0.2, copies=6):
    """Occurrences clustered within prompts: a prompt holds a token in all `copies` of its sequences with one
    shared deviation, and shifts every token it holds by its own sentiment, with which the words it holds
    also go (positive words in positive prompts). The per-token means then share prompt-level noise."""
    truth = np.linspace(-1, 1, len(tokens))
    rz = (rm - rm.mean()) / rm.std()
    mood = rng.normal(0, 1, n_prompts)
    prob = p_token * 2 / (1 + np.exp(-1.5 * mood[:, None] * rz[None, :]))
    jj, kk = np.nonzero(rng.random((n_prompts, len(tokens))) < prob)
    shared = truth[kk] + rng.normal(0, 0.3, len(jj)) + mood[jj]
    values = np.repeat(shared, copies) + rng.normal(0, 0.1, len(jj) * copies)
    return tokens[np.repeat(kk, copies)], values, np.repeat(jj, copies)


def _token_means(tok, val):
    ids = np.unique(tok)
    return ids, np.array([val[tok == t].mean() for t in ids])


def test_prompt_cluster_ci_covers_the_tau_the_design_gives_and_a_token_bootstrap_does_not():
    """50 datasets of 10 prompts and ~1,000 tokens with clustered occurrences. The estimand is the tau this
    design gives on average over draws of prompts (token means of a few noisy occurrences attenuate tau;
    no interval undoes that, so the noise-free tau is not the target)."""
    from scipy import stats

    from irmprobe.analysis.agreement import tau_cluster_ci, tau_confidence_interval

    tokens = np.arange(1000, 2000)
    rm = np.linspace(-1, 1, len(tokens)) + 0.8 * np.sin(np.arange(len(tokens)) * 1.7)
    rm_map = dict(zip(tokens.tolist(), rm.tolist()))
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(200):
        ids, means = _token_means(*_clustered(rng, tokens, rm, 10)[:2])
        draws.append(stats.kendalltau(means, rm[ids - 1000]).statistic)
    target = float(np.mean(draws))
    cluster = token = 0
    for seed in range(50):
        tok, val, units = _clustered(rng, tokens, rm, 10)
        ids, means = _token_means(tok, val)
        lo, hi = tau_cluster_ci(tok, val, units, rm_map, ids, n_resamples=100, seed=seed)
        cluster += lo <= target <= hi
        lo, hi = tau_confidence_interval(means, rm[ids - 1000], n_resamples=100, seed=seed)
        token += lo <= target <= hi
    assert cluster >= 45, (cluster, token)  # >= 90% of 50
    assert token <= 40, (cluster, token)  # the token-type bootstrap holds the shared prompt noise fixed


def test_prompt_cluster_ci_is_seeded_and_needs_two_prompts():
    from irmprobe.analysis.agreement import tau_cluster_ci

    tok = np.array([1, 2, 3, 1, 2, 3])
    val = np.array([0.1, 0.5, 0.9, 0.2, 0.4, 1.0])
    rm = {1: -1.0, 2: 0.0, 3: 1.0}
    assert tau_cluster_ci(tok, val, np.zeros(6, dtype=int), rm, np.array([1, 2, 3])) == (None, None)
    units = np.array([0, 0, 0, 1, 1, 1])
    one = tau_cluster_ci(tok, val, units, rm, np.array([1, 2, 3]), n_resamples=50, seed=3)
    assert one == tau_cluster_ci(tok, val, units, rm, np.array([1, 2, 3]), n_resamples=50, seed=3)
    with pytest.raises(ValueError, match="one entry per row"):
        tau_cluster_ci(tok, val[:5], units, rm, np.array([1, 2, 3]))


def _row(tau, ci=None):
    from irmprobe.results import ViewRow

    return ViewRow("sae_irm", "behavioural", 80, False, tau=tau, tau_ci=ci)


def test_primary_comparison_with_three_controls_is_a_t_test_against_their_spread():
    from scipy import stats

    from irmprobe.analysis.verdict import ALPHA, primary_comparison

    taus = [-0.018, 0.039, 0.182]  # the demo's three controls (issue figures)
    organism = _row(0.33, [0.26, 0.40])
    controls = [_row(t, [t - 0.07, t + 0.07]) for t in taus]
    pc = primary_comparison(organism, controls)
    assert pc.df == 2 and pc.test == "t, 2 d.f." and pc.outcome == "unrelated"
    assert pc.z == pytest.approx((0.33 - np.mean(taus)) / (np.std(taus, ddof=1) * np.sqrt(4 / 3)), rel=1e-9)
    assert pc.p_value == pytest.approx(2 * stats.t.sf(pc.z, 2), rel=1e-9)
    assert pc.p_value > ALPHA
    # Far beyond a tight control distribution, the t-test calls it, in the direction of the difference.
    tight = [_row(t) for t in (0.01, 0.0, -0.01, 0.02, -0.02)]
    assert primary_comparison(organism, tight).outcome == "agrees"
    assert primary_comparison(_row(-0.33), tight).outcome == "opposes"


def test_prediction_t_is_the_new_draw_against_the_controls_spread_by_column():
    from scipy import stats

    from irmprobe.analysis.agreement import prediction_t

    # One value against controls 0, 1, 2: mean 1, sd 1, t = 2 / sqrt(1 + 1/3), 2 d.f.
    t, p = prediction_t(3.0, [0.0, 1.0, 2.0])
    assert float(t) == pytest.approx(2 / np.sqrt(4 / 3), rel=1e-12)
    assert float(p) == pytest.approx(2 * stats.t.sf(2 / np.sqrt(4 / 3), 2), rel=1e-12)
    # Column by column: the second column's controls do not vary (NaN), the third is below its controls.
    t, p = prediction_t(np.array([3.0, 6.0, -1.0]), np.array([[0.0, 5.0, 1.0], [1.0, 5.0, 2.0], [2.0, 5.0, 3.0]]))
    assert t[0] == pytest.approx(2 / np.sqrt(4 / 3)) and np.isnan(t[1]) and t[2] == pytest.approx(-3 / np.sqrt(4 / 3))
    assert np.isnan(p[1]) and p[0] == pytest.approx(float(prediction_t(3.0, [0.0, 1.0, 2.0])[1]))
    with pytest.raises(ValueError, match="2 or more controls"):
        prediction_t(1.0, [0.5])
    with pytest.raises(ValueError, match="shaped like one control"):  # three values against one set of controls
        prediction_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])


def test_primary_comparison_case_with_z_above_3_under_the_old_rule_is_not_called_with_three_wide_controls():
    from irmprobe.analysis.verdict import primary_comparison

    organism = _row(0.40, [0.37, 0.43])
    controls = [_row(t, [t - 0.03, t + 0.03]) for t in (0.0, 0.05, 0.10)]
    old = (0.40 - 0.05) / np.sqrt(((0.06 / 3.92) ** 2) + max(0.06 / 3.92, 0.05) ** 2)
    assert old >= 3.4
    assert primary_comparison(organism, controls).outcome == "unrelated"


def test_fewer_than_two_matched_controls_make_no_call_whatever_the_difference():
    """One control cannot measure the spread between random-reward organisms: the old z rule called this
    planted case (z +5.4 with prompt-cluster intervals) "agrees"; now there is no call, and it says why."""
    from irmprobe.analysis.verdict import primary_comparison
    from irmprobe.results import ViewRow

    def row(tau, half):
        return ViewRow("sae_irm", "behavioural", 80, False, tau=tau, tau_ci=[tau - half, tau + half])

    one = primary_comparison(row(0.13, 0.04), [row(-0.08, 0.04)])
    assert one.outcome == "no call" and one.z is None and "needs 2 or more" in one.reason
    assert one.difference == pytest.approx(0.21)
    # Three controls, one of which is not known to match (a given model): two remain, so a test is made.
    controls = [row(t, 0.01) for t in (0.0, 0.01, -0.01)]
    some = primary_comparison(row(0.6, 0.04), controls, matched=[True, True, False])
    assert some.df == 1 and some.control_taus == [0.0, 0.01]
    none = primary_comparison(row(0.6, 0.04), controls, matched=[False, False, True])
    assert none.outcome == "no call" and "compare.assume_matched" in none.reason


def test_the_call_is_made_at_the_configured_level():
    from scipy import stats

    from irmprobe.analysis.verdict import primary_comparison

    controls = [_row(t) for t in (-0.05, 0.0, 0.05, 0.02)]
    t_at = lambda p: stats.t.isf(p / 2, 3) * np.std([-0.05, 0.0, 0.05, 0.02], ddof=1) * np.sqrt(1.25)  # noqa: E731
    just_inside = _row(0.005 + t_at(0.01) * 1.01)  # beyond the alpha = 0.01 critical value
    assert primary_comparison(just_inside, controls, alpha=0.01).outcome == "agrees"
    assert primary_comparison(just_inside, controls, alpha=0.001).outcome == "unrelated"


def _metrics(primary, *, reward=-0.4):
    from irmprobe.results import SCHEMA_VERSION, RunMetrics

    empty = dict(config={}, organism={}, layers={}, capture={}, saes=[], sae_layers=[], vader_compound={},
                 examples=[], irm={}, agreement=[], full_vocabulary=[], control=[], control_agreement=[],
                 disagreements={}, feature_alignment=None, tokens={}, rm={}, verdict=[], stage_seconds={},
                 stage_status={})
    return RunMetrics(schema_version=SCHEMA_VERSION, primary=primary, kl={"mean": 3.0, "se": 0.2},
                      reward={"diff_mean": reward, "diff_se": 0.05, "diff_z": reward / 0.05}, **empty)


def test_a_comparison_short_of_its_level_but_at_p_005_is_undecided_not_unrelated():
    """The calibration's negated-RM organism against the demo's three null organisms (full-vocabulary taus):
    t -6.83 on 2 d.f., p 0.021, not called at 0.01. It is read as undecided, pointing against the RM, with what a
    call needs; the planted organism (t +1.06) stays unrelated."""
    from dataclasses import replace

    from irmprobe.analysis.verdict import SUGGEST, primary_comparison, reading, verdict
    from irmprobe.reporting.summary import comparison_lines
    from irmprobe.reporting.tracking import headline_scalars
    from irmprobe.results import ViewRow

    def row(tau):
        return ViewRow("full_vocab_log_ratio", "behavioural", 3499, False, tau=tau)

    controls = [row(t) for t in (-0.012, -0.033, -0.089)]
    negated = primary_comparison(row(-0.359), controls)
    assert negated.outcome == "unrelated" and negated.z == pytest.approx(-6.83, abs=0.01)
    assert 0.01 < negated.p_value < SUGGEST and reading(negated) == "undecided (opposes)"
    lines = verdict(_metrics(negated), is_null=False)
    line = next(v for v in lines if v.startswith("the call is UNDECIDED"))
    assert "lies below the controls' at p 0.021" in line and "|t| > 9.92 (5 controls: 4.60)" in line
    assert "whether it learned against it" in line and "the RM's reward fell" in line
    assert not any("UNRELATED" in v for v in lines)
    planted = primary_comparison(row(0.005), controls)
    assert reading(planted) == "unrelated" and planted.p_value > SUGGEST
    assert any("learned something UNRELATED" in v for v in verdict(_metrics(planted, reward=0.0), is_null=False))
    # Above the controls at p <= SUGGEST: undecided, pointing to agreement; the JSON form reads the same.
    up = replace(negated, tau=0.2, z=6.83, difference=0.245)
    assert reading(up) == "undecided (agrees)" == reading(up.to_json())
    assert "whether it learned the RM" in next(v for v in verdict(_metrics(up), is_null=False) if "UNDECIDED" in v)
    assert reading(replace(negated, p_value=0.004, outcome="opposes")) == "opposes"
    # The explanation reads the same way; a fitted primary view inside its shuffled-target range stays undecided.
    explained = replace(_metrics(negated), explanation=replace(negated, view="sae_irm"))
    assert any(v.startswith("explanation (the SAE IRM") and "it is UNDECIDED: it lies below the controls' at "
               "p <= 0.05, short of the level 0.01" in v for v in verdict(explained, is_null=False))
    fitted = replace(up, view="sae_irm")
    shuffled = ViewRow("baseline_shuffled", "baseline", 80, False, tau=0.1, tau_range=[-0.1, 0.3])
    lines = verdict(replace(_metrics(fitted), agreement=[shuffled]), is_null=False)
    assert any(v.startswith("the call is UNDECIDED") for v in lines) and not any("UNRELATED" in v for v in lines)
    assert reading(replace(negated, alpha=None)) == "unrelated"
    assert reading(None) == "undetermined"
    # The summary and W&B carry the reading beside the outcome.
    metrics = _metrics(negated).to_json()
    assert comparison_lines(metrics)[0].endswith("-> unrelated at alpha 0.01 (undecided (opposes): p <= 0.05)")
    assert comparison_lines(_metrics(planted).to_json())[0].endswith("-> unrelated at alpha 0.01")
    assert headline_scalars(metrics)["primary/reading"] == "undecided (opposes)"
    assert headline_scalars(_metrics(planted).to_json())["primary/reading"] == "unrelated"
