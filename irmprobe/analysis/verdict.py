"""The verdict: plain statements resting on one declared primary comparison.

Three cases are told apart, each against the matched control organism(s) and the baselines: the
tuned model learned the RM, learned against it, or learned something unrelated to it. The
organism report (did the RM's reward rise, fall or stay; how far did the model move, in KL) is
read beside it: a reward that fell is a finding, not a failure to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from irmprobe.analysis.agreement import prediction_t
from irmprobe.analysis.depth import depth_text
from irmprobe.results import PrimaryComparison, RunMetrics, ViewRow

Z = 3.0
"""Standard errors the RM's reward change must clear to count as a rise or fall (the organism report)."""

ALPHA = 0.01
"""The default two-sided level of the primary comparison's call (``compare.alpha``)."""

SUGGEST = 0.05
"""A primary comparison not called at its level but with p at or below this is read as undecided, pointing to the
direction of its t, not as "unrelated": with 3 controls (2 d.f.) a call at 0.01 needs |t| > 9.92, so an organism
tuned against the RM can lie many control sds out and still not be called (docs/method.md, "Calibration")."""


def reading(p: PrimaryComparison | dict | None) -> str:
    """What a primary comparison (or its JSON form) says: its outcome, or ``undecided (agrees)`` / ``undecided
    (opposes)`` where it was not called at its level (``unrelated``) but has p <= :data:`SUGGEST` (a two-sided
    level above the call's; under the null it happens with probability SUGGEST - alpha)."""
    if p is None:
        return "undetermined"
    get = p.get if isinstance(p, dict) else lambda k: getattr(p, k)
    if (get("outcome") == "unrelated" and get("p_value") is not None and get("alpha") is not None
            and get("alpha") < get("p_value") <= SUGGEST):
        return f"undecided ({'agrees' if get('z') > 0 else 'opposes'})"
    return get("outcome")


def _se(row: ViewRow) -> float | None:
    """Standard error of a tau from its 95% CI (the larger of the prompt-cluster and token-type bootstraps'):
    shown beside the tau; the call does not use it (the controls' spread already holds each tau's noise)."""
    if row is None or row.tau_ci is None or None in row.tau_ci:
        return None
    widths = [ci[1] - ci[0] for ci in (row.tau_ci, row.tau_ci_tokens) if ci is not None and None not in ci]
    return max(widths) / (2 * 1.96)


def primary_comparison(row: ViewRow, controls: list[ViewRow | None], *, alpha: float = ALPHA,
                       matched: list[bool] | None = None) -> PrimaryComparison:
    """A view's tau against the matched controls' taus, by a test that counts the controls' spread.

    The organism's tau is tested as one more draw from the distribution of taus that random-reward organisms
    of the same recipe give (each already carrying its own estimation noise): a prediction-interval t-test,
    ``t = (tau - mean) / (sd * sqrt(1 + 1/k))`` with k - 1 degrees of freedom, called at the two-sided level
    ``alpha``; exact when the taus are normal and the controls exchangeable with the organism under the null.
    Only controls known to match the organism's recipe enter (``matched``, one flag per control); with fewer
    than 2 of them no call is made (one control cannot measure the spread between random-reward organisms: the
    old one-control z rule called a planted organism "agrees" at z +4.9 that the controls' spread does not
    support) and ``reason`` says why.
    """
    matched = [True] * len(controls) if matched is None else list(matched)
    usable = [c for c, m in zip(controls, matched) if m and c is not None and c.tau is not None]
    taus = [c.tau for c in usable]
    se = _se(row)
    if row.is_zero or row.tau is None or not controls:  # no control at all: the verdict says the control is off
        return PrimaryComparison(row.name, row.tau, se, taus, None, None, None,
                                 "zero" if row.is_zero else "undetermined", alpha=alpha)
    if len(taus) < 2:
        known = sum(1 for c, m in zip(controls, matched) if c is not None and c.tau is not None)
        reason = (f"{len(taus)} control(s) known to match the organism's recipe ({known} with a tau in all): the "
                  "t-test against the controls needs 2 or more" + (
                      "; a given tuned model's recipe is not known: name matched controls (compare.controls) "
                      "and set compare.assume_matched=true if you vouch for them" if known > len(taus) else ""))
        diff = row.tau - float(np.mean([c.tau for c in controls if c is not None and c.tau is not None])) \
            if known else None
        return PrimaryComparison(row.name, row.tau, se, taus, None, diff, None, "no call", alpha=alpha,
                                 reason=reason)
    k = len(taus)
    diff = row.tau - float(np.mean(taus))
    spread = float(np.std(taus, ddof=1))
    test = f"t, {k - 1} d.f."
    if spread == 0:
        return PrimaryComparison(row.name, row.tau, se, taus, spread, diff, None, "undetermined", test=test,
                                 df=k - 1, alpha=alpha)
    stat, p = (float(x) for x in prediction_t(row.tau, taus))
    outcome = "unrelated" if p > alpha else "agrees" if stat > 0 else "opposes"
    return PrimaryComparison(row.name, row.tau, se, taus, spread, diff, stat, outcome, test=test, df=k - 1,
                             p_value=p, alpha=alpha)


VIEW_WORDS = {
    "full_vocab_log_ratio": "full-vocabulary log-ratio: every vocabulary token the RM values, its mean change in "
                            "log-probability over every held-out context; not fitted",
    "sae_irm": "the SAE IRM: out-of-fold token values of the linear IRM over SAE features",
}
"""How the verdict names each view a comparison can rest on."""


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
                                                 "the primary view has no tau, or the controls' taus do not vary."))
    elif p.outcome == "zero":
        out.append("the primary view is identically zero: no implicit reward was learned (no tau applies).")
    elif p.outcome == "no call":
        out.append(f"no call on the RM: {p.reason}. {VIEW_WORDS.get(p.view, p.view)}: tau {p.tau:+.3f}"
                   + ("" if p.difference is None else f", {p.difference:+.3f} from the controls' mean") + ".")
    else:
        c = float(np.mean(p.control_taus))
        fitted = p.view != "full_vocab_log_ratio"
        floor, ceiling = (shuffled.tau_range if fitted and shuffled is not None and shuffled.tau_range
                          else (None, None))
        beyond = {"agrees": ceiling is None or p.tau > ceiling, "opposes": floor is None or p.tau < floor}
        out.append(f"primary comparison ({VIEW_WORDS.get(p.view, p.view)}): tau {p.tau:+.3f} against "
                   f"{len(p.control_taus)} matched random-reward controls at {c:+.3f} (sd {p.control_se:.3f}): "
                   f"difference {p.difference:+.3f}, t {p.z:+.2f} ({p.df} d.f., p {p.p_value:.2g}, called at "
                   f"p <= {p.alpha:g})" + (f"; shuffled-target fits span [{floor:+.3f}, {ceiling:+.3f}]"
                                           if floor is not None else "") + ".")
        if p.outcome == "agrees" and beyond["agrees"]:
            out.append("the tuned model learned the RM: its implicit reward ranks tokens like the RM, beyond every "
                       "control" + (" and shuffled-target fit" if floor is not None else "")
                       + ("" if direction == "rose" else f", although the RM's reward {direction}") + ".")
        elif p.outcome == "opposes" and beyond["opposes"]:
            out.append("the tuned model learned AGAINST the RM: its implicit reward ranks tokens opposite to the RM, "
                       "beyond every control" + (" and shuffled-target fit" if floor is not None else "")
                       + ("; the RM's reward fell accordingly." if direction == "fell" else "."))
        elif reading(p).startswith("undecided"):  # short of its level (or of a fitted view's shuffled range)
            k = len(p.control_taus)
            more = k + 2
            out.append(f"the call is UNDECIDED: the implicit reward lies {'above' if p.z > 0 else 'below'} the "
                       f"controls' at p {p.p_value:.2g}, short of the level {p.alpha:g} the call was set at: with "
                       f"{k} controls ({k - 1} d.f.) a call needs |t| > {stats.t.isf(p.alpha / 2, k - 1):.2f} "
                       f"({more} controls: {stats.t.isf(p.alpha / 2, more - 1):.2f}). Name more controls "
                       f"(compare.n_controls) to decide whether it learned {'the RM' if p.z > 0 else 'against it'}; "
                       f"the RM's reward {direction if direction != 'stayed' else 'did not move'}.")
        else:
            moved = m.kl.get("mean", 0.0) - 3 * (m.kl.get("se") or 0.0) > 0
            out.append(("the tuned model learned something UNRELATED to the RM: it moved from its base (KL above "
                        "zero) but its implicit reward is not told apart from the controls'"
                        if moved else "the tuned model learned nothing the comparison can detect: its implicit "
                        "reward is not told apart from the controls' and it barely moved from its base")
                       + (f"; the RM's reward {direction}." if direction != "stayed" else
                          "; the RM's reward did not move."))
    e = m.explanation
    if e is not None and e.tau is not None and e.outcome not in ("zero", "undetermined"):
        told = {"agrees": "ranks tokens like the RM beyond the controls", "opposes":
                "ranks tokens opposite to the RM beyond the controls", "unrelated": "is not told apart from the "
                "controls'", "no call": "is not tested (" + (e.reason or "") + ")"}[e.outcome]
        if reading(e).startswith("undecided"):
            told = (f"is UNDECIDED: it lies {'above' if e.z > 0 else 'below'} the controls' at p <= {SUGGEST:g}, short "
                    f"of the level {e.alpha:g}")
        stat = "" if e.z is None else f", t {e.z:+.2f} ({e.df} d.f., p {e.p_value:.2g})"
        out.append(f"explanation ({VIEW_WORDS.get(e.view, e.view)}): tau {e.tau:+.3f}"
                   + ("" if not e.control_taus else f" against the controls' {np.mean(e.control_taus):+.3f}")
                   + f"{stat}: it {told}.")
    for c in m.control:
        if not c.matched:
            out.append(f"{c.branch}: not known to match the organism: {c.note or 'its settings differ'}.")
    if m.attribution:
        out.append(attribution_line(m.attribution) + generation_text((m.validation or {}).get("ablation")) + ".")
    decision = decision_line(m)
    if decision:
        out.append(decision)
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
    if d.get("named"):
        out.append(named_words_line(d["named"]))
    return out


def named_words_line(n: dict, limit: int = 15) -> str:
    """The ``discover.words`` list's line: what passes in its own family (at most ``limit`` named), whether the RM
    values it, the list as one set, how much its words move together in the controls, what could not be tested,
    and how often the same list passed on the controls."""
    name = Path(n["path"]).name
    if n.get("note"):
        return f"named words ({name}): not tested: {n['note']}."
    skipped = [f"{len(n['not_one_token'])} not one token after a space"] if n["not_one_token"] else []
    skipped += [f"{len(n['same_token'])} the same token as an earlier word"] if n.get("same_token") else []
    skipped += [f"{len(n['untested'])} not tested by discovery"] if n["untested"] else []
    if not n["entries"]:
        return f"named words ({name}): no word of the list could be tested ({'; '.join(skipped)})."
    passed = [e for e in n["entries"] if e["direction"]]
    beyond = {"unvalued": "the RM values it at zero", "against": "against the RM's sign", "valued": "as the RM does"}
    found = (", ".join(f"{e['word']!r} {e['direction']} {e['effect']:+.2f} nats (q {e['q']:.1e}; "
                       f"{beyond[e['category'].split('_')[1]]})" for e in passed[:limit])
             + (f" and {len(passed) - limit} more" if len(passed) > limit else "")) if passed else "none"
    whole = n.get("set") or {}
    together = ""
    if n.get("shared_share") is not None:
        together = f"; the controls' listed words share {n['shared_share']:.0%} of their spread"
    controls = n.get("control_passes")
    check = (f"; the same list on each control against the others (a pass there is false): "
             f"{', '.join(map(str, controls))} word(s) pass" if controls is not None else "")
    tail = (f" ({'; '.join(skipped)})" if skipped else "") + together + check + "."
    if "passed" not in whole:  # a record of an earlier version (no gate): its words' passes as they were
        return (f"named words ({name}; Benjamini-Hochberg over its {n['n']} words only, a family apart from the open "
                f"search): {len(passed)} pass q < {n['alpha']:g}: {found}" + tail)
    head = (f"named words ({name}; its {n['n']} words against the controls' values of the same words, t on "
            f"{n['df']} d.f.: the list as one set, then each word within a list that passes, Benjamini-Hochberg over "
            f"the list only)")
    if whole.get("p") is None:
        return head + ": the controls' list means do not vary, so nothing is tested" + tail
    stat = f"mean z {whole['effect']:+.2f}, t {whole['t']:+.2f}, p {whole['p']:.2g}"
    if not whole.get("passed"):
        return (head + f": as one set, {stat}: not told apart from the controls at {n['alpha']:g}, so no word is "
                "named" + tail)
    return head + f": as one set, {stat}: it passes; {len(passed)} word(s) pass q < {n['alpha']:g}: {found}" + tail


def null_family(row: dict) -> tuple[int, bool, str]:
    """The random sets an ablation row is judged against: those of its size and kind (features of a dictionary of
    the change, ablated with the base in lockstep, or of the tuned model's SAEs); a set of change features also
    meets only sets with its count at each hook point (its ``blocks``, e.g. ``b27:3 b28:7``; rows that predate the
    record have none)."""
    change = row.get("mode") == "change"
    return int(row["n_features"]), change, (row.get("blocks") or "") if change else ""


def null_calls(rows: list[dict]) -> dict | None:
    """How often the causal rule calls a random feature set causal against the other random sets of its size.

    Returns ``{"called": k, "n": n, "sizes": {size: [called, judged]} (a size of change features keyed
    ``"<size> change"``, with its count at each hook point where the rows record it: ``"10 change b27:3 b28:7"``),
    "closest": the largest margin of a
    random set's Bonferroni lower end over the others' range (> 0: a call)}``; None where no random set was
    judged. The n checks are not independent trials: within a size, one set's call makes another's unlikely
    (each is judged against the rest), so k / n is a rough rate and no binomial interval is given; runs with
    other seeds add independent checks.
    """
    checks = [r for r in rows if r.get("null_check")]
    if not checks:
        return None
    sizes: dict[int | str, list[int]] = {}
    margins = []
    for r in checks:
        size, change, blocks = null_family(r)
        entry = sizes.setdefault(f"{size} change {blocks}".strip() if change else size, [0, 0])
        entry[0] += int(r["null_check"]["called"])
        entry[1] += 1
        margins.append(r["gain_share_adjusted"]["ci"][0] - r["null_check"]["range"][1])
    return {"called": sum(c for c, _ in sizes.values()), "n": len(checks),
            "sizes": dict(sorted(sizes.items(), key=lambda kv: (isinstance(kv[0], str), int(str(kv[0]).split()[0])))),
            "closest": float(max(margins))}


def sampling_text(rows: list[dict]) -> str | None:
    """How many samples the ablation drew per prompt, and why (None: rows that predate the record)."""
    none = next((r for r in rows if r["set"] == "none"), {})
    sp, test = none.get("sampling"), none.get("gain_test") or {}
    if not sp:
        return None
    prompts = f"{test['n_prompts']} prompts x " if test.get("n_prompts") else ""
    text = f"{prompts}{sp['samples_per_prompt']} samples per prompt"
    if sp.get("share_half_width") is None:
        return text + " (fixed: validate.samples_per_prompt)"
    if sp.get("note"):
        return text + f" ({sp['note']})"
    last = sp["checks"][-1] if sp.get("checks") else {}
    widest = "undefined" if last.get("widest") is None else f"{last['widest']:.3f}"
    if sp.get("stopped_by") == "widths":
        return (text + f", where sampling stopped: every random set's share of the gain has a 95% CI half-width "
                f"<= {sp['share_half_width']:g} (widest {widest}; {sp['min_samples_per_prompt']} to {sp['most']} "
                "allowed)")
    if sp.get("stopped_by") == "gain":
        return (text + ", where sampling stopped: the reward gain was not significantly positive, so no share is "
                "computed (sampling on until it is would be optional stopping on that test)")
    return (text + f", the most allowed: the random sets' shares did not reach a 95% CI half-width of "
            f"{sp['share_half_width']:g} (widest {widest})")


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
    out = []
    for r in rows:
        g = r.get("gain_share")
        if not g or not (r["set"].startswith(("decision_top", "decision_change_top", "irm_top", "judge_flagged",
                                              "attribution_", "patching bound"))):
            continue
        if None in g["ci"]:
            out.append(f"{r['set'].split(' (')[0]} removes {g['share']:+.2f} of the gain; its interval is undefined "
                       "(resamples of the prompts with no reward gain), so nothing is concluded from it.")
            continue
        text = f"{r['set'].split(' (')[0]} removes {g['share']:+.2f} [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}] of the gain"
        rnd, adj = r.get("random"), r.get("gain_share_adjusted")
        if r["set"].startswith("patching bound"):
            text += (" (upper bound: the chosen layers carry most of it)." if g["ci"][0] >= 0.5 else
                     " (upper bound: the chosen layers carry less than half of it; the change is spread elsewhere).")
        elif rnd is not None and adj is not None and rnd["above_random"] is not None:
            lo, hi = rnd["range"]
            kind = "-feature sets of the same dictionaries of the change" if r.get("mode") == "change" else \
                "-feature sets"
            if r.get("mode") == "change" and r.get("blocks"):
                kind += f" ({r['blocks']})"
            against = (f"{len(rnd['shares'])} random {r['n_features']}{kind} remove {lo:+.2f} to {hi:+.2f}; "
                       f"its {adj['confidence']:.1%} interval (Bonferroni over {adj['n_tests']} targeted sets) is "
                       f"[{adj['ci'][0]:+.2f}, {adj['ci'][1]:+.2f}]")
            text += (f": {against}, wholly above them: these features carry the reward causally." if
                     rnd["above_random"] else f": {against}, not above them.")
            if r["set"].startswith("irm_top"):
                text += " Reader-side features read tokens already written, so a null here is expected."
        else:
            text += "."
        out.append(text)
    null = null_calls(rows)
    if null is not None and out:
        per_size = ", ".join(f"{c} of {n} " + (f"{size}-feature sets" if isinstance(size, int) else
                                                f"{size.split()[0]}-feature sets of change features"
                                                + (f" ({' '.join(size.split()[2:])})" if len(size.split()) > 2
                                                   else ""))
                             for size, (c, n) in null["sizes"].items())
        out.append(f"known nulls: the same rule, applied to each random set against the other random sets of its "
                   f"size, called {null['called']} of {null['n']} causal ({per_size}; the highest lower end "
                   + ("cleared the others' range by" if null["closest"] > 0 else "stayed below the others' range by")
                   + f" {abs(null['closest']):.2f}); these checks are not independent within a size, so "
                   f"{null['called']}/{null['n']} is a rough false-call rate.")
    return out


def null_named(result: dict) -> dict | None:
    """The naming rule (the smallest feature set whose faithfulness reaches ``threshold`` is named) applied to the
    random feature sets of the features-only curve, whose answer is known (drawn, not ranked): ``{"reached": how
    many random sets reach the threshold, "n": how many were drawn, "highest": the largest random
    faithfulness}``; None where the curve has no random set. Sizes at or above the number of candidate features
    are left out (every draw there is the whole candidate set, not a random one; results that predate
    ``n_candidates`` keep them). The draws share their prompts, so they are not independent trials."""
    curves = result.get("curves") or {}
    limit = curves.get("n_candidates")
    values = [v for row in curves.get("feature_rows", []) if limit is None or row["k"] < limit
              for v in (row.get("random") or {}).get("values", []) if v is not None]
    if not values:
        return None
    threshold = result["threshold"]
    return {"reached": int(sum(v >= threshold for v in values)), "n": len(values), "highest": float(max(values))}


def _null_named_text(result: dict) -> str:
    null = null_named(result)
    if null is None:
        return ""
    return (f"; known nulls: {null['reached']} of {null['n']} random feature sets reach {result['threshold']:.0%} "
            f"(the highest {null['highest']:.2f})")


def decision_line(m: RunMetrics) -> str | None:
    """One line: how well the decision-side IRM fits r_t, and (from the depth stage) how much of r_t the residual
    stream's change after the captured blocks holds for it to read, and from which block it holds enough."""
    fits = (m.irm or {}).get("fits") or {}
    name = next((n for n in ("sae_irm_bilinear", "sae_irm_decision") if n in fits), None)
    depth = m.depth if m.depth and "skipped" not in m.depth else None
    change = (m.attribution or {}).get("decision_view")
    if name is None and depth is None and change is None:
        return None
    r2 = fits[name].get("test_r2") if name else None
    head = ("decision-side IRM (" + ("bilinear" if name == "sae_irm_bilinear" else "state at t-1") + " view): "
            + ("identically zero" if r2 is None else f"out-of-fold R^2 {r2:+.2f} of r_t") if name else
            "decision-side IRM: not fitted" if change is None else "decision-side IRM (the fit stage's): not fitted")
    if change is not None:  # the same bilinear view on the attribute stage's dictionaries of the change
        fitted = "identically zero" if change["test_r2"] is None else f"out-of-fold R^2 {change['test_r2']:+.2f}"
        tau = ("" if change["tau"] is None
               else f", tau {change['tau']:+.2f} against the RM ({change['n_tokens']} tokens)")
        top = ", ".join(t["node"] for t in change["top"][:5])
        head += (f"; on the dictionaries of the change (the attribute stage's; the same prompt folds): {fitted}{tau}"
                 + shuffled_text(change.get("shuffled")) + (f", its top features {top}" if top else ""))
    if depth is None:
        return head + "."
    return f"{head}; {depth_text(depth, m.capture.get('layers') or [], depth.get('n_layers'))}."


def shuffled_text(shuffled: dict | None) -> str:
    """`` (shuffled targets, n refits: R^2 a to b, tau c to d)``: a view's shuffled-target range ("" without one)."""
    r2 = [v for v in (shuffled or {}).get("test_r2", []) if v is not None]
    if not shuffled or not shuffled.get("test_r2"):
        return ""
    n, zero = len(shuffled["test_r2"]), len(shuffled["test_r2"]) - len(r2)
    text = (f" (shuffled targets, {n} refits" + (f", {zero} identically zero" if zero and r2 else "") + ": R^2 "
            + (f"{min(r2):+.2f} to {max(r2):+.2f}" if r2 else "identically zero"))
    tau = [v for v in shuffled.get("tau", []) if v is not None]
    return text + (f", tau {min(tau):+.2f} to {max(tau):+.2f})" if tau else ")")


def attribution_line(result: dict) -> str:
    """One line: how many features carry how much of the implicit reward, against random sets, or why none do;
    then how many random feature sets the naming rule would have named (a known null)."""
    if "skipped" in result:
        return f"attribution: skipped ({result['skipped']})"
    curves = result["curves"]
    where = f"{result['kind']} at blocks {', '.join(map(str, result['layers']))}"
    errors = "SAE error terms"
    if result.get("dictionary") == "change":  # the nodes are features of the change, not of the activations
        where += " (dictionaries of the change)"
        errors = "change dictionaries' error terms"
    context = (f"the hook points carry {_attr_pct(curves['bound']['value'])} [{_attr_ci(curves['bound']['ci'])}] of "
               f"the implicit reward, their {errors} alone "
               f"{_attr_pct(curves['errors_only']['value'])} of that" + hook_points_text(result))
    k = result.get("smallest_k_features")
    if k is None:
        rows = [r for r in curves.get("feature_rows", []) if r["faithfulness"]["value"] is not None]
        best = max(rows, key=lambda r: r["faithfulness"]["value"], default=None)
        nodes = result.get("smallest_k")
        with_errors = next((r for r in curves["rows"] if r["k"] == nodes), None)
        return (f"no set of <= {rows[-1]['k'] if rows else 0} SAE features at {where} carries "
                f"{result['threshold']:.0%} of what the hook points carry: the best reaches "
                + (f"{best['faithfulness']['value']:.2f} (k={best['k']})" if best else "nothing")
                + _every_feature_text(curves, best)
                + (f"; with the error terms, {nodes} nodes ({with_errors['errors_in_set']} of them errors) reach "
                   f"{with_errors['faithfulness']['value']:.2f}" if with_errors else "")
                + f"; {context}" + _null_named_text(result) + seeds_text(result.get("seed_checks")))
    row = next(r for r in curves["feature_rows"] if r["k"] == k)
    f, c = row["faithfulness"], row["completeness"]
    rng = row["random"]["range"]
    return (f"{k} SAE feature(s) at {where} carry {f['value']:.0%} [{_attr_ci(f['ci'])}] of what the hook points "
            f"carry (faithfulness on held-out prompts; completeness {c['value']:.2f}); random {k}-feature sets: "
            + (f"{rng[0]:+.2f} to {rng[1]:+.2f}" if rng else "-") + _every_feature_text(curves, row) + f"; {context}"
            + _null_named_text(result) + seeds_text(result.get("seed_checks")))


def hook_points_text(result: dict) -> str:
    """The other hook points the attribution considered, to follow its own bound ("" where they were not
    measured): the share of the implicit reward each set carries (the base's activations patched in at every
    point of it; no dictionary), so that a missing faithful set can be read against where one could exist; then
    over how many blocks' MLP outputs the change is spread (:func:`spread_text`)."""
    own = [[result["kind"], int(b)] for b in result["layers"]]
    spread = [h["points"] for _, h in spread_rows(result)]
    others = [h for h in result.get("hook_points") or [] if h["points"] != own and h["points"] not in spread]
    text = ("; the other hook points considered (each set patched together, same prompts) carry: "
            + ", ".join(f"{h['label']} {_attr_pct(h['value'])} [{_attr_ci(h['ci'])}]" for h in others)
            if others else "")
    return text + spread_text(result)


def spread_rows(result: dict) -> list[tuple[int, dict]]:
    """The measured hook point sets that are the MLP outputs of the top n blocks of the attribution's
    ``spread_order`` (the chosen blocks' and every block's included where they are such a set), as (n, set) by
    n; [] for a result without the order, or with fewer than two such sets (nothing to spread over)."""
    order = (result.get("spread_order") or {}).get("order")
    if not order:
        return []
    prefixes = {tuple(sorted(order[:n])): n for n in range(1, len(order) + 1)}
    rows = {}
    for h in result.get("hook_points") or []:
        blocks = tuple(sorted(b for kind, b in h["points"]))
        if all(kind == "mlp_out" for kind, _ in h["points"]) and blocks in prefixes:
            rows.setdefault(prefixes[blocks], h)
    return sorted(rows.items(), key=lambda row: row[0]) if len(rows) >= 2 else []


def spread_needed(result: dict) -> int | None:
    """The fewest top-ranked blocks whose MLP outputs, patched together, carry the attribution's threshold as a
    share of the implicit reward itself (``1 - m(patched) / m(tuned)``, a point estimate, as every rule of the
    attribution reads its shares; not the faithfulness's share of what the hook points carry); None where no
    measured set does or the shares are undefined (``m(tuned) <= 0``)."""
    return next((n for n, h in spread_rows(result) if h["value"] is not None and h["value"] >= result["threshold"]),
                None)


def spread_text(result: dict) -> str:
    """"; over the blocks' MLPs: ..." from :func:`spread_rows` ("" without them)."""
    rows = spread_rows(result)
    if not rows:
        return ""
    if all(h["value"] is None for _, h in rows):
        return "; over the blocks' MLPs: undefined (m(tuned) <= 0)"
    sizes = [str(k) for k, _ in rows]
    if rows[-1][0] == len(result["spread_order"]["order"]):
        sizes[-1] = f"all {sizes[-1]}"
    n = spread_needed(result)
    return (f"; over the blocks' MLPs (point estimates): the MLP outputs of the top {', '.join(sizes[:-1])} and "
            f"{sizes[-1]} blocks (ranked by {result['spread_order']['ranked_by']}) carry "
            f"{', '.join(_attr_pct(h['value']) for _, h in rows)} of the implicit reward; "
            + (f"the fewest that carry {result['threshold']:.0%} of it: the top {n}" if n is not None
               else f"none carries {result['threshold']:.0%} of it"))


def seeds_hold(seeds: dict) -> bool | None:
    """Does the run's named set hold across the seeds stage's dictionaries? Two things must hold at every other
    seed: a set of at most the named set's size reaches the threshold ("k features carry it"), and, where they
    were measured, the named features' counterparts there (each one's closest decoder direction,
    :func:`irmprobe.validation.attribution.counterparts`) reach it too ("these features carry it";
    :func:`counterparts_hold`). None: the run's dictionaries named no set, or nothing was checked."""
    k = seeds["primary"]["smallest_k_features"]
    if k is None or not seeds.get("checks"):
        return None
    size = all(c["smallest_k_features"] is not None and c["smallest_k_features"] <= k for c in seeds["checks"])
    return size and counterparts_hold(seeds) is not False


def counterparts_hold(seeds: dict) -> bool | None:
    """Do the named features' counterparts carry the threshold's share in every other seed's dictionaries (their
    faithfulness, errors at base, on the attribution's held-out prompts)? None: no counterparts were measured
    (no set was named, or a result from before they were)."""
    matched = [c.get("matched") for c in seeds.get("checks") or []]
    if seeds.get("matched_set") or not matched or any(m is None for m in matched):  # matched_set: no named set
        return None
    return all(m["faithfulness"]["value"] is not None and m["faithfulness"]["value"] >= seeds["threshold"]
               for m in matched)


def matched_text(matched: dict | None, whose: str = "the named features'") -> str:
    """One seed's counterparts of the named features (or of ``whose``): how many match at the record's
    ``match_cosine``, what they carry and, where recorded, what random sets of as many features of those
    dictionaries carry."""
    if not matched:
        return ""
    cosines = [f["cosine"] for f in matched["features"]]
    close = sum(c >= matched["match_cosine"] for c in cosines)
    rnd = matched.get("random")  # None in a check from before the stage recorded it
    return (f"; {whose} counterparts (closest decoder direction: {close} of {len(cosines)} at cosine >= "
            f"{matched['match_cosine']:g}, median {np.median(cosines):.2f}) carry "
            f"{_fmt_or(matched['faithfulness']['value'])}"
            + (f" (random {len(cosines)}-feature sets of those dictionaries: {rnd[0]:.2f} to {rnd[1]:.2f})"
               if rnd else ""))


def matched_whose(seeds: dict) -> str:
    """Whose counterparts a seeds record matched: the named features', or (no set named) the ablated top k's."""
    ranked = seeds.get("matched_set")
    return f"the top {ranked['k']} attributed features'" if ranked else "the named features'"


def matched_set_text(ranked: dict) -> str:
    """What the seed checks matched where no set was named: the top k, the set the ablation takes, and their share."""
    here = ranked.get("faithfulness")
    return (f"the top {ranked['k']} attributed features (the set the ablation takes"
            + (f"; they carry {here:.2f} here" if here is not None else "") + ")")


def seeds_text(seeds: dict | None) -> str:
    """Whether the attribution's named set holds across its dictionaries trained with other seeds (the seeds stage,
    :func:`seeds_hold`), to follow the attribution line ("" where nothing was checked)."""
    if not seeds or "checks" not in seeds:
        return ""
    ranked = seeds.get("matched_set")  # no named set: the counterparts are those of the ablated top k
    whose = matched_whose(seeds)

    def one(c):
        if c["smallest_k_features"] is not None:
            return (f"{c['smallest_k_features']} features (faithfulness {_fmt_or(c['faithfulness'])}, completeness "
                    f"{_fmt_or(c['completeness'])})" + matched_text(c.get("matched"), whose))
        best = c.get("best")
        return (f"none of <= {seeds['max_k']}" + (f" (best {best['faithfulness']:.2f} at k={best['k']})"
                                                  if best else "") + matched_text(c.get("matched"), whose))

    label = "change seed" if seeds.get("dictionary", "change") == "change" else "seed"
    others = "; ".join(f"{label} {c['seed']}: {one(c)}" for c in seeds["checks"])
    p = seeds["primary"]
    held = seeds_hold(seeds)
    if held is True:
        return (f"; the set holds across {len(seeds['checks']) + 1} dictionary seeds (smallest set reaching "
                f"{seeds['threshold']:.0%}: {label} {p['seed']}: {p['smallest_k_features']} features; "
                f"{others})")
    if held is False:
        return (f"; the set is a property of this dictionary ({label} {p['seed']}), not shown to be the "
                f"tuning's: with dictionaries of other seeds the smallest set reaching {seeds['threshold']:.0%} "
                f"(at most {p['smallest_k_features']} features to hold"
                + (f", and its features' counterparts reaching {seeds['threshold']:.0%}"
                   if counterparts_hold(seeds) is not None else "") + f") is: {others}")
    if ranked:
        return f"; no set named, so {matched_set_text(ranked)} are matched in dictionaries of other seeds: {others}"
    return f"; dictionaries of other seeds: {others}"


def _fmt_or(value, spec: str = ".2f") -> str:
    return "undefined" if value is None else format(value, spec)


def generation_text(rows: list[dict] | None) -> str:
    """What ablating the attribution's features while the tuned model samples removed of the RM's reward gain, against
    random sets of their size and kind, to follow the attribution line ("" where no such share was measured)."""
    row = next((r for r in rows or [] if r["set"].startswith("attribution_") and r.get("gain_share")), None)
    if row is None or None in row["gain_share"]["ci"]:
        return ""
    g, rnd, n = row["gain_share"], row.get("random") or {}, row["n_features"]
    which = f"these {n}" if "_faithful_" in row["set"] else f"the top {n} attributed"
    text = (f"; {which} features ablated while the tuned model samples remove {g['share']:.0%} "
            f"[{g['ci'][0]:.2f}, {g['ci'][1]:.2f}] of the RM's reward gain")
    if rnd.get("range") and rnd.get("above_random") is not None:
        text += (f" (random {n}-feature sets of the same dictionaries: {rnd['range'][0]:+.2f} to "
                 f"{rnd['range'][1]:+.2f}; " + ("above them)" if rnd["above_random"] else "not above them)"))
    bound = next((r["gain_share"] for r in rows if r["set"].startswith("patching bound") and r.get("gain_share")),
                 None)
    if bound is not None and None not in bound["ci"] and g["ci"][0] > bound["ci"][1]:
        # Ablating part of what the hook points carry removes more than replacing all of it by the base's: the
        # ablation is not a return to the base, so its share is no measure of the tuning's change it carries.
        text += (f", more than patching the base's whole activation in at the hook points removes "
                 f"({bound['share']:+.2f} [{bound['ci'][0]:.2f}, {bound['ci'][1]:.2f}]), so the share may overstate "
                 "what these features carry of the tuning's change")
        if g["ci"][0] > 1:
            text += "; the reward falls below the base model's"
    return text


def _every_feature_text(curves: dict, row: dict | None = None) -> str:
    """Every feature together (errors at base): spread over many features, or not in the features at all. With
    ``row`` (a features-only curve row): whether that set carries more than every feature together, its CI wholly
    above theirs, in which case the dictionaries' other features work against it."""
    every = curves.get("features_all") or {}
    share = every.get("value")
    if share is None:
        return ""
    text = f", every feature together {share:.2f}"
    faith = (row or {}).get("faithfulness") or {}
    low = (faith.get("ci") or [None])[0]
    high = (every.get("ci") or [share, share])[1]
    if low is not None and high is not None and low > high:
        # The set's share is then one side of a cancellation inside this dictionary (measured on the demo organism:
        # 100 change features carry 0.63 where every feature together carries 0.10), not what the features of the
        # change carry between them.
        text += (f" (less than these {row['k']} carry: the dictionaries' other features work against them, so what "
                 "a set carries depends on how this dictionary cut up the change)")
    return text


def _attr_pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _attr_ci(ci) -> str:
    return "-" if ci is None or None in ci else f"{ci[0]:.2f}, {ci[1]:.2f}"
