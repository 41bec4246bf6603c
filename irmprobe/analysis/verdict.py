"""The verdict: plain statements resting on one declared primary comparison.

Three cases are told apart, each against the matched control organism(s) and the baselines: the
tuned model learned the RM, learned against it, or learned something unrelated to it. The
organism report (did the RM's reward rise, fall or stay; how far did the model move, in KL) is
read beside it: a reward that fell is a finding, not a failure to learn.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from irmprobe.results import PrimaryComparison, RunMetrics, ViewRow

Z = 3.0
"""Standard errors a difference must clear to count."""

ALPHA = float(2 * stats.norm.sf(Z))
"""The two-sided level every decision of the primary comparison is made at (0.0027, that of |z| >= 3)."""

ONE_CONTROL = ("z, one control (its bootstrap s.e. stands in for the spread between random-reward organisms, "
               "which one control cannot measure: anti-conservative; set compare.n_controls >= 2)")


def _se(row: ViewRow) -> float | None:
    """Standard error of a tau from its 95% CI: the larger of the prompt-cluster and token-type bootstraps.

    Neither measures the spread between random-reward organisms, which one control cannot; the cluster
    bootstrap alone, the valid one for the noise of one organism's tau, called a planted organism tuned
    toward words the RM does not value "agrees" at z +4.9 against one control (tests/integration/
    test_planted.py), so the one-control rule takes the wider of the two.
    """
    if row is None or row.tau_ci is None or None in row.tau_ci:
        return None
    widths = [ci[1] - ci[0] for ci in (row.tau_ci, row.tau_ci_tokens) if ci is not None and None not in ci]
    return max(widths) / (2 * 1.96)


def primary_comparison(row: ViewRow, controls: list[ViewRow | None]) -> PrimaryComparison:
    """The primary IRM's tau against the matched controls' taus, by a test that counts the controls' spread.

    With k >= 2 controls the organism's tau is tested as one more draw from the controls' distribution
    (the taus random-reward organisms give; each already carries its own estimation noise): a
    prediction-interval t-test, ``t = (tau - mean) / (sd * sqrt(1 + 1/k))`` with k - 1 degrees of freedom,
    called at the same two-sided level as ``|z| >= 3`` (``ALPHA``). Few controls make a wide t: with 3 of
    them only |t| > 19.2 is called. With one control there is no between-organism spread to measure; the
    old rule stands, ``z = (tau - control) / sqrt(se^2 + control_se^2)`` with bootstrap s.e.s, and the
    comparison says it is anti-conservative.
    """
    taus = [c.tau for c in controls if c is not None and c.tau is not None]
    ses = [_se(c) for c in controls if c is not None and _se(c) is not None]
    se = _se(row)
    if row.is_zero or row.tau is None or not taus or (se is None and len(taus) < 2):
        outcome = "zero" if row.is_zero else "undetermined"
        return PrimaryComparison(row.name, row.tau, se, taus, None, None, None, outcome)
    diff = row.tau - float(np.mean(taus))
    if len(taus) >= 2:
        k = len(taus)
        spread = float(np.std(taus, ddof=1))
        scale = spread * float(np.sqrt(1 + 1 / k))
        if scale == 0:
            return PrimaryComparison(row.name, row.tau, se, taus, spread, diff, None, "undetermined",
                                     test=f"t, {k - 1} d.f.", df=k - 1)
        stat = diff / scale
        p = float(2 * stats.t.sf(abs(stat), k - 1))
        outcome = "unrelated" if p > ALPHA else "agrees" if stat > 0 else "opposes"
        return PrimaryComparison(row.name, row.tau, se, taus, spread, diff, stat, outcome,
                                 test=f"t, {k - 1} d.f.", df=k - 1, p_value=p)
    control_se = float(np.sqrt(np.mean(np.square(ses)))) if ses else 0.0
    z = diff / float(np.sqrt(se**2 + control_se**2)) if se > 0 or control_se > 0 else None
    outcome = "undetermined" if z is None else "agrees" if z >= Z else "opposes" if z <= -Z else "unrelated"
    return PrimaryComparison(row.name, row.tau, se, taus, control_se, diff, z, outcome,
                             test=ONE_CONTROL, p_value=None if z is None else float(2 * stats.norm.sf(abs(z))))


def _z(value) -> str:
    return "undefined" if value is None else f"{value:+.1f}"


def reward_line(reward: dict, kl: dict) -> tuple[str, str]:
    """(direction of the RM reward: rose / fell / stayed, the line saying so)."""
    z = reward.get("diff_z")
    if z is None:
        return "stayed", "the RM's reward could not be compared (no spread over prompts)."
    direction = "rose" if z >= Z else "fell" if z <= -Z else "stayed"
    text = {"rose": "rose", "fell": "FELL (a finding, not a failure to learn)", "stayed": "did not move reliably"}
    return direction, (f"the RM's reward {text[direction]}: tuned - base {reward['diff_mean']:+.3f} ± "
                       f"{reward['diff_se']:.3f} ({_z(z)} s.e.); the tuned model is {kl['mean']:.3f} ± {kl['se']:.3f} "
                       "nats (KL per continuation) from its base.")


def verdict(m: RunMetrics, is_null: bool) -> list[str]:
    """Plain statements of what the figures do and do not show."""
    if is_null:
        return ["null organism: the tuned model is the base model, so there is no implicit reward to find."]
    direction, line = reward_line(m.reward, m.kl)
    out = [line]
    p = m.primary
    shuffled = next((r for r in m.agreement if r.name == "baseline_shuffled"), None)
    if p is None or p.outcome == "undetermined":
        out.append("no primary comparison: " + ("the run has no control organism (compare.control is off), so no "
                                                 "IRM figure can be called agreement or disagreement."
                                                 if p is None or not p.control_taus else
                                                 "the primary IRM has no tau (too few RM tokens in the held-out text)."))
    elif p.outcome == "zero":
        out.append("the primary IRM is identically zero: no implicit reward was learned (no tau applies).")
    else:
        c = float(np.mean(p.control_taus))
        floor, ceiling = (shuffled.tau_range if shuffled is not None and shuffled.tau_range else (None, None))
        beyond = {"agrees": ceiling is None or p.tau > ceiling, "opposes": floor is None or p.tau < floor}
        se = "" if p.tau_se is None else f" ± {p.tau_se:.3f}"
        stat = (f"z {p.z:+.1f}" if p.df is None else f"t {p.z:+.2f} ({p.df} d.f., p {p.p_value:.3g}, called at "
                                                    f"p <= {ALPHA:.4f})")
        out.append(f"primary comparison ({p.view}, out-of-fold token values): tau {p.tau:+.3f}{se} against "
                   f"{len(p.control_taus)} matched random-reward control(s) at {c:+.3f} (spread {p.control_se:.3f}): "
                   f"difference {p.difference:+.3f}, {stat}"
                   + (f"; shuffled-target fits span [{floor:+.3f}, {ceiling:+.3f}]" if floor is not None else "") + ".")
        if p.outcome == "agrees" and beyond["agrees"]:
            out.append("the tuned model learned the RM: its implicit reward ranks tokens like the RM, beyond the "
                       "control and every shuffled-target fit" + ("" if direction == "rose" else
                                                                  f", although the RM's reward {direction}") + ".")
        elif p.outcome == "opposes" and beyond["opposes"]:
            out.append("the tuned model learned AGAINST the RM: its implicit reward ranks tokens opposite to the RM, "
                       "beyond the control and every shuffled-target fit" + (
                           "; the RM's reward fell accordingly." if direction == "fell" else "."))
        else:
            moved = m.kl.get("mean", 0.0) - 3 * (m.kl.get("se") or 0.0) > 0
            out.append(("the tuned model learned something UNRELATED to the RM: it moved from its base (KL above "
                        "zero) but its implicit reward is not told apart from the control's"
                        if moved else "the tuned model learned nothing the comparison can detect: its implicit "
                        "reward is not told apart from the control's and it barely moved from its base")
                       + (f"; the RM's reward {direction}." if direction != "stayed" else
                          "; the RM's reward did not move."))
    for c in m.control:
        if not c.matched:
            out.append(f"{c.branch}: not known to match the organism: {c.note or 'its settings differ'}.")
    out += ablation_lines(m.validation or {})
    informed = [r.name for r in m.agreement if r.family == "rm_informed" and r.tau is not None]
    if informed:
        out.append("RM-informed views (" + ", ".join(informed) + ") use RM labels: they show the RM is decodable from "
                   "the features, which is as true of a model that learned nothing.")
    if m.discovery is not None:
        out.extend(discovery_lines(m.discovery))
    return out


def _named(d: dict, direction: str) -> tuple[list[dict], str]:
    """Discoveries of one direction the RM does not explain, and how to name them (concepts, else tokens)."""
    found = d["entries"][f"{direction}_unvalued"] + d["entries"][f"{direction}_against"]
    sign = 1 if direction == "rewarded" else -1
    named = [f"feature {c['feature']} ({', '.join(repr(t) for t in c['labels'] if t is not None)})"
             for c in d["concepts"] if np.sign(c["weight"]) == sign][:3]
    tokens = ", ".join(repr(e["token"]) for e in found[:8])
    return found, "; ".join(named) + (f"; tokens {tokens}" if named else tokens)


def discovery_lines(d: dict) -> list[str]:
    """What the tuned model rewards (or penalises) that the RM values at zero or against its sign."""
    against = "" if d.get("control") else " (no control organism: each token tested against zero)"
    out = []
    for direction, verb in (("rewarded", "rewards"), ("penalised", "penalises")):
        found, names = _named(d, direction)
        if found:
            n = d["counts"][f"{direction}_unvalued"] + d["counts"][f"{direction}_against"]
            out.append(f"the tuned model also {verb}: {names}, q < {d['alpha']:g} ({n} token(s) the RM values at zero "
                       f"or against its sign{against}).")
    if not out:
        out.append(f"discovery: no token the RM values at zero or against its sign passes the FDR threshold "
                   f"(q < {d['alpha']:g}; {d['n_tested']} tokens tested{against}): nothing found beyond the RM.")
    return out


def ablation_lines(val: dict) -> list[str]:
    """What the causal checks show: each targeted set's share of the reward gain removed against random features."""
    rows = val.get("ablation") or []
    gain = next((r["gain_share"] for r in rows if r["set"] == "none" and r.get("gain_share")), None)
    if gain is None:
        if not rows:
            return []
        test = next((r.get("gain_test") for r in rows if r["set"] == "none"), None)
        if test is not None:
            return [f"no causal check applies: the tuned model's RM reward gain over the base on the ablation prompts "
                    f"is {test['gain']:+.3f} [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}] (95% CI over "
                    f"{test['n_prompts']} prompts), not significantly positive, so no share of it is computed."]
        return ["no causal check applies: the tuned model's reward gain over the base is not positive on the "
                "ablation prompts."]
    rand = {r["n_features"]: r["gain_share"] for r in rows if r["set"].startswith("random") and r.get("gain_share")}
    out = []
    for r in rows:
        g = r.get("gain_share")
        if not g or not (r["set"].startswith(("decision_top", "irm_top", "patching bound"))):
            continue
        if None in g["ci"]:
            out.append(f"{r['set'].split(' (')[0]} removes {g['share']:+.2f} of the gain; its interval is undefined "
                       "(resamples of the prompts with no reward gain), so nothing is concluded from it.")
            continue
        text = f"{r['set'].split(' (')[0]} removes {g['share']:+.2f} [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}] of the gain"
        control = rand.get(r["n_features"])
        if r["set"].startswith("patching bound"):
            text += (" (upper bound: the chosen layers carry most of it)." if g["ci"][0] >= 0.5 else
                     " (upper bound: the chosen layers carry less than half of it; the change is spread elsewhere).")
        elif control is not None and None not in control["ci"]:
            apart = g["ci"][0] > control["ci"][1]
            text += (f", above {r['n_features']} random features ({control['share']:+.2f}, CIs apart): these features "
                     "carry the reward causally." if apart else
                     f", not above {r['n_features']} random features ({control['share']:+.2f}).")
            if r["set"].startswith("irm_top"):
                text += " Reader-side features read tokens already written, so a null here is expected."
        out.append(text)
    return out
